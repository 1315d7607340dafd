"""Rate–accuracy evaluation: the loop, image-codec baselines, Bjøntegaard deltas and reports."""
from mtfc.evaluation.baselines import (CODECS, CodedBatch, RoundTrip, RoundTripCache, RoundTripDataset, available_codecs,
                                       codec_method, collate_coded, roundtrip, uncompressed_method)
from mtfc.evaluation.bdrate import bd_metric, bd_rate, rate_at_metric, upper_envelope
from mtfc.evaluation.report import (PROVENANCE_KEYS, bd_rate_table, collect_provenance, disk_usage,
                                    reference_rate_table, write_report)
from mtfc.evaluation.runner import (DIRECTIONS, ROW_FIELDS, BatchResult, Scorer, bits_per_pixel, evaluate_method,
                                    raw_rgb_bytes)

__all__ = ["CODECS", "CodedBatch", "RoundTrip", "RoundTripCache", "RoundTripDataset", "available_codecs", "codec_method",
           "collate_coded", "roundtrip", "uncompressed_method", "bd_metric", "bd_rate", "rate_at_metric",
           "upper_envelope", "PROVENANCE_KEYS", "bd_rate_table", "collect_provenance", "disk_usage",
           "reference_rate_table", "write_report", "DIRECTIONS", "ROW_FIELDS", "BatchResult", "Scorer",
           "bits_per_pixel", "evaluate_method", "raw_rgb_bytes"]
