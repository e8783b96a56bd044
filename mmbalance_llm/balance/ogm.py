"""`ogm`: On-the-fly Gradient Modulation as published in T-PAMI 2024.

Wei, Hu, Peng, Tang, Hu, "On-the-fly Modulation for Balanced Multimodal Learning", T-PAMI 2024
(the journal version of Peng et al., CVPR 2022). Stage: optimization.
Follows: GeWu-Lab/BML_TPAMI2024@4b3aa4fd841856c4acbebf48549e6c59fbf7635e:code/main.py, code/scripts/train_ogm.sh.

The T-PAMI code (GeWu-Lab/BML_TPAMI2024, `main.py` / `models/Classifier.py`) uses the same update rule as
the CVPR'22 OGM-GE: s_m = sum_i softmax(z_m)_i[y_i] from the split concat head (bias split evenly),
rho_m = s_m / s_other, k_m = 1 - tanh(alpha * rho_m) for the dominant modality (rho_m > 1), and with
OGM_GE Gaussian noise N(0, std(g)^2) on the encoders' gradients. So `ogm` is **not** a new algorithm: it
reuses `ogm_ge`'s code (balance/ogm_ge.py) and only carries the T-PAMI defaults:

- a warm-up without modulation: the T-PAMI loop modulates only when `epoch > 5` (0-based), i.e.
  `modulation_starts = 6` (the paper speaks of "5 warm-up epochs"; the code's `epoch <= 5` test gives six);
- `modulation_ends = 60` and `alpha = 0.8` (the T-PAMI `train_ogm.sh`), `modulation = OGM_GE`
  (the script's default).

M > 2 is supported as in `ogm_ge`: rho_m compares with the mean of the other modalities. Differences from
the official code: exactly those `ogm_ge` documents (scaling through a hook on h_m, so every
parameter of encoder m is scaled, not only 4-D conv weights; noise on weight tensors after the all-reduce).
alpha = 0 with `modulation: OGM` reproduces the baseline exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmbalance_llm.balance import register
from mmbalance_llm.balance.base import hp
from mmbalance_llm.balance.ogm_ge import OGMConfig, OGMGE


@dataclass
class OGMTPAMIConfig(OGMConfig):
    alpha: float = hp(0.8, "Modulation strength alpha in k = 1 - tanh(alpha * rho) (T-PAMI script). 0 disables it.", min=0.0)
    modulation: str = hp("OGM_GE", "'OGM_GE' (scaling + Gaussian noise, the T-PAMI default) or 'OGM' (scaling only).")
    modulation_starts: int = hp(6, "First modulated epoch (0-based); epochs 0-5 are the T-PAMI warm-up.", min=0)
    modulation_ends: int = hp(60, "Last modulated epoch (0-based, inclusive; T-PAMI script).", min=0)


@register
class OGMTPAMI(OGMGE):
    name = "ogm"
    stage = "optimization"
    paper = "Wei et al., On-the-fly Modulation for Balanced Multimodal Learning, T-PAMI 2024 (OGM)"
    config_class = OGMTPAMIConfig
