"""lmms-eval's legacy plugin layout (``LMMS_EVAL_PLUGINS``): model id -> class name in ``models/<id>.py``."""
AVAILABLE_MODELS = {"mmbalance_llava": "MmbalanceLlava"}
