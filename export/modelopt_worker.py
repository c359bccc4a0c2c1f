"""Runs inside NVIDIA ModelOpt's own environment (``python -I modelopt_worker.py JOB.json``), never imported by
clipad: ModelOpt pins its own onnx and onnxruntime-gpu, which must not meet the user's ONNX Runtime. It reads the job
written by ``quantize_modelopt``, calibrates on the CPU and writes the Q/DQ file; it imports only ModelOpt and numpy.
"""
import json
import sys

PROGRESS = "clipad-modelopt-batch"   # stdout lines the parent turns into its progress bar (quantize_modelopt)


def reporting_provider(base):
    class ReportingProvider(base):
        """ModelOpt's own calibration data provider, which also says on stdout each batch it hands out (ModelOpt
        itself shows nothing for the half hour a ViT-L calibration takes)."""

        served = 0

        def get_next(self):
            batch = super().get_next()
            if batch is not None:
                self.served += 1
                print(PROGRESS, self.served, len(self.calibration_data_list), flush=True)
            return batch

    return ReportingProvider


def main(job_file: str) -> int:
    import numpy as np

    with open(job_file) as f:
        job = json.load(f)
    from modelopt.onnx.quantization import quantize
    from modelopt.onnx.quantization.calib_utils import CalibrationDataProvider

    calib = np.load(job["calibration"], allow_pickle=False)
    reader = reporting_provider(CalibrationDataProvider)(job["source"], {job["input"]: calib})
    # quantize_mode is left at ModelOpt's default, INT8 (per-channel weights, per-tensor activations, symmetric).
    quantize(job["source"], calibration_data_reader=reader,
             calibration_method=job["method"], calibration_eps=["cpu"], nodes_to_quantize=job["nodes"],
             op_types_to_quantize=["MatMul", "Gemm", "Conv"], high_precision_dtype="fp32",
             disable_mha_qdq=True, calibrate_per_node=job["per_node"], output_path=job["output"],
             log_level="WARNING")
    from importlib.metadata import version

    with open(job["result"], "w") as f:
        json.dump({"modelopt": version("nvidia-modelopt"), "calibration_batches": reader.served}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
