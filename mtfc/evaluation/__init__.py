"""Rate–accuracy evaluation: the loop, image-codec baselines, Bjøntegaard deltas and reports."""
from mtfc.evaluation.baselines import CODECS, RoundTrip, available_codecs, codec_method, roundtrip, uncompressed_method
from mtfc.evaluation.bdrate import bd_metric, bd_rate, upper_envelope
from mtfc.evaluation.report import PROVENANCE_KEYS, bd_rate_table, collect_provenance, write_report
from mtfc.evaluation.runner import ROW_FIELDS, BatchResult, bits_per_pixel, evaluate_method, raw_rgb_bytes

__all__ = ["CODECS", "RoundTrip", "available_codecs", "codec_method", "roundtrip", "uncompressed_method",
           "bd_metric", "bd_rate", "upper_envelope", "PROVENANCE_KEYS", "bd_rate_table", "collect_provenance",
           "write_report", "ROW_FIELDS", "BatchResult", "bits_per_pixel", "evaluate_method", "raw_rgb_bytes"]
