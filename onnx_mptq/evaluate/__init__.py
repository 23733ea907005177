"""evaluate: what the network-level searches measure candidates with (not the emitted model).

* :mod:`.fakequant` -- the parametric fake-quant graph (quantization parameters as graph inputs)
  and its cut into stages;
* :mod:`.evaluator` -- :class:`~.evaluator.ParamEvaluator`, ONNX Runtime sessions of that graph
  and the distance of an assignment's logits from FP32 on a calibration subset; per-tensor SQNR
  between two models;
* :mod:`.factory` -- the one place that builds the searches' evaluation graph and evaluator.

Layering: below ``search`` (which imports this package lazily, so importing a search module does
not import ONNX Runtime), above ``passes``, ``graph`` and ``calibrate.session``. Importing this
package imports nothing; :mod:`.evaluator` is the only module here that imports onnxruntime at
import time.
"""
