"""Fidelity table: every balancing method's quantity on a small fixed input against a short, independent
re-expression of the math of the code it follows (cited per row as repo@commit:file), at 1e-6.

Each row builds its own weights, batch and features from fixed seeds and returns (ours, reference) as
tensors. The re-expressions follow the official loops (per-sample Python sums, if/else branches, the
official orderings) rather than this package's vectorised code, so a change of semantics shows up here.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmbalance_llm.balance import available_methods, get_method
from mmbalance_llm.balance.base import TrainContext
from mmbalance_llm.data.features import FeatureDataset, collate
from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

MODS = ["audio", "visual"]
C = 4
BB = "GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


from conftest import OneProcess as _OneProcess  # noqa: E402


def model_for(mods=MODS, seed=0, arch=None):
    torch.manual_seed(seed)
    if arch == "mmtm":
        from mmbalance_llm.config import ModelConfig
        from mmbalance_llm.models.registry import build_model

        return build_model(ModelConfig(architecture="mmtm", feature_dim=5, hidden_dim=8, num_layers=1),
                           list(mods), {m: [6] for m in mods}, C)
    cfg = MultimodalClassifierConfig(modalities=list(mods), input_shapes={m: [6] for m in mods}, num_classes=C,
                                     feature_dim=5, hidden_dim=8, num_layers=1)
    return MultimodalClassifier(cfg).eval()  # no dropout noise in the compared quantities


def dataset(n=48, seed=0, mods=MODS):
    gen = torch.Generator().manual_seed(seed)
    return FeatureDataset({m: torch.randn(n, 6, generator=gen) for m in mods}, torch.arange(n) % C)


def batch_of(ds, n=16):
    return collate([ds[i] for i in range(n)])


def ctx_for(mods=MODS, loaders=None, epoch=0, step=0):
    recipe = SimpleNamespace(train=SimpleNamespace(per_device_train_batch_size=16, per_device_eval_batch_size=32,
                                                   num_train_epochs=1, gradient_accumulation_steps=1,
                                                   learning_rate=1e-3, weight_decay=0.0))
    loaders = loaders or {}
    train_dataset = loaders["train_eval"].dataset if "train_eval" in loaders else None
    return TrainContext(accelerator=_OneProcess(), modalities=list(mods), num_classes=C, recipe=recipe,
                        loaders=loaders, seed=0, epoch=epoch, global_step=step, train_dataset=train_dataset,
                        eval_batch_size=32)


def forward(model, batch):
    return model(**{m: batch[m] for m in model.modalities})


def setup(name, model, ctx=None, **hp):
    b = get_method(name, **hp)
    b.setup(ctx or ctx_for(), model)
    return b


def true_prob_sum(z, y):
    """Official score: sum([softmax(z)[i][y[i]] for i in range(B)])."""
    p = torch.softmax(z.detach().double(), 1)
    return sum(p[i, y[i]] for i in range(len(y)))


def encoder_grads(model):
    return torch.cat([p.grad.flatten() for m in model.modalities for _, p in model.modality_parameters(m)])


# -- rows ------------------------------------------------------------------------------------------
def row_ogm_ge():
    """GeWu-Lab/OGM-GE_CVPR2022@343dc1d95c9bda88f105c0da8d24f185e0e98b54:main.py: coefficients from the
    summed true-class probabilities, grad = k g + N(0, std(g)) with std of the *unscaled* g."""
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    b = setup("ogm_ge", model)
    out = forward(model, batch)
    loss, _ = b.loss(model, batch, out)
    model.zero_grad()
    loss.backward()
    b.after_backward(model, 3)
    ours = encoder_grads(model)
    model.zero_grad()
    out = forward(model, batch)
    F.cross_entropy(out.logits, batch["labels"]).backward()
    y = batch["labels"]
    score_a, score_v = true_prob_sum(out.unimodal_logits["audio"], y), true_prob_sum(out.unimodal_logits["visual"], y)
    ratio_v = score_v / score_a
    if ratio_v > 1:
        coeff = {"visual": 1 - math.tanh(0.8 * float(ratio_v)), "audio": 1.0}
    else:
        coeff = {"audio": 1 - math.tanh(0.8 / float(ratio_v)), "visual": 1.0}
    gen = torch.Generator().manual_seed(0 * 1_000_003 + 3)  # the method's (seed, step) noise stream
    ref = []
    for m in MODS:
        for _, p in model.modality_parameters(m):
            g = p.grad
            new = g * coeff[m]
            if g.dim() >= 2:  # noise on weight tensors (official: 4-D conv weights)
                new = new + torch.randn(g.shape, generator=gen) * (g.std().item() + 1e-8)
            ref.append(new.flatten())
    return ours, torch.cat(ref)


def row_ogm():
    """GeWu-Lab/BML_TPAMI2024@4b3aa4fd841856c4acbebf48549e6c59fbf7635e:code/main.py: modulation only when
    `epoch > 5` and inside modulation_starts..ends of scripts/train_ogm.sh (60)."""
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    b = setup("ogm", model)
    ours = []
    for epoch in range(70):
        b.ctx.epoch = epoch
        b.loss(model, batch, forward(model, batch))
        ours.append(float(b._active))
    return torch.tensor(ours), torch.tensor([float(e > 5 and e <= 60) for e in range(70)])


def row_opm():
    """GeWu-Lab/BML_TPAMI2024@4b3aa4fd841856c4acbebf48549e6c59fbf7635e:code/models/Classifier.py (`calcu_q`,
    `Modality_drop`) and code/main.py (`warm_up = 1 if epoch <= 5`): drop rates, the 1/(1-theta) rescale and
    the warm-up."""
    from mmbalance_llm.balance.opm import opm_drop_rates

    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    out = forward(model, batch)
    y = batch["labels"]
    s = torch.stack([true_prob_sum(out.unimodal_logits[m], y) for m in MODS]).float()
    ours = [opm_drop_rates(s, 0.5, 0.5), opm_drop_rates(torch.tensor([30.0, 10.0]), 0.5, 0.5)]
    ref = []
    for p1, p2 in (s.tolist(), (30.0, 10.0)):
        r1, r2 = math.tanh(max(0.0, p1 / p2 - 1)), math.tanh(max(0.0, p2 / p1 - 1))
        q = torch.tensor([0.5 * (1 + 0.5 * r1) if r1 > 0 else 0.0, 0.5 * (1 + 0.5 * r2) if r2 > 0 else 0.0])
        ref.append(q.clip(0, 1))
    b = setup("opm", model)
    active = []
    for epoch in range(10):
        b.ctx.epoch = epoch
        active.append(float(b._active()))
    ours.append(torch.tensor(active))
    ref.append(torch.tensor([float(not e <= 5) for e in range(10)]))
    # the rescale: theta = sum(d q) / sum(d), features / (1 - theta) on the kept samples
    b.ctx.epoch, b.ctx.global_step = 6, 0
    feats = {m: out.features[m].detach() for m in MODS}
    masked = b._mask_features(model.fusion, y, feats)
    q = b.last_drop_rates
    theta = sum(5 * q[m] for m in MODS) / (5 * len(MODS))
    for m in MODS:
        kept = masked[m].abs().sum(1) > 0
        ours.append(masked[m][kept].flatten())
        ref.append((feats[m][kept] / (1 - theta)).flatten() if q and max(q.values()) > 0 else feats[m][kept].flatten())
    return torch.cat([t.flatten().double() for t in ours]), torch.cat([t.flatten().double() for t in ref])


def row_pmr():
    """fanyunfeng-bit/Modal-Imbalance-PMR@3615e48983555089b0e693380087617c3797a641:main_Prototype_grad.py
    (`calculate_prototype`: floor(n/10) batches, class means, no EMA for `epoch <= 0`; `train_epoch`: the
    prototype CE on the modality with the lower prototype score)."""
    from mmbalance_llm.balance.pmr import PMR

    model, ds = model_for(), dataset(n=160)
    train = torch.utils.data.DataLoader(ds, batch_size=16)
    b = setup("pmr", model, ctx_for(loaders={"train": train, "train_eval": train}))
    assert isinstance(b, PMR)
    ours, ref, old = [], [], None
    for epoch in range(4):
        with torch.no_grad():  # move the encoders so every epoch's prototypes differ
            for p in model.encoders.parameters():
                p.mul_(1.1)
        b.on_epoch_start(model, epoch)
        idx = b.prototype_indices(epoch, len(ds))
        assert len(idx) == (len(train) // 10) * 16  # the official `all_num // 10` batches of the batch size
        with torch.no_grad():
            feats = model.encode(**{m: ds.tensors[m][idx] for m in MODS})
        new = {}
        for m in MODS:
            proto, count = torch.zeros(C, 5), [0] * C
            for c, lab in enumerate(ds.labels[idx].tolist()):
                count[lab] += 1
                proto[lab] += feats[m][c]
            for k in range(C):
                proto[k] /= count[k]
            official_epoch = epoch - 1  # prototypes used in epoch e are computed after training epoch e - 1
            new[m] = proto if old is None or official_epoch <= 0 else 0.8 * proto + 0.2 * old[m]
        old = new
        ours += [b.prototypes[m] for m in MODS]
        ref += [new[m] for m in MODS]
    batch = batch_of(ds)
    out = forward(model, batch)
    loss, _ = b.loss(model, batch, out)
    y = batch["labels"]
    sim = {m: -torch.cdist(out.features[m], old[m]) for m in MODS}
    ratio_a_p = true_prob_sum(sim["audio"], y) / true_prob_sum(sim["visual"], y)
    beta, lam = (0.0, 1.0) if ratio_a_p > 1 else (1.0, 0.0)
    expected = F.cross_entropy(out.logits, y) + beta * F.cross_entropy(sim["audio"], y) + lam * F.cross_entropy(sim["visual"], y)
    return torch.cat([t.flatten() for t in ours] + [loss.reshape(1)]), torch.cat([t.flatten() for t in ref] + [expected.reshape(1)])


def row_inforeg():
    """GeWu-Lab/InfoReg_CVPR2025@939b2ed11dcbf4daddb2507157b2cb9f8d0e24d7:main.py (`train_epoch`): k from the
    audio trace list that starts with ten zeros, beta = 0.95 exp(tanh(score_a - score_v)) on batch sums (0.1
    for visual), the proximal term added before the Fisher sum of Conv/Linear weight gradients."""
    from mmbalance_llm.balance.inforeg import window_slope

    traces = [3.0, 5.0, 4.0, 6.0, 6.5, 6.4, 6.45, 6.44, 6.46, 6.45, 6.45, 6.45, 6.44, 6.44]
    ours, ref = [], []
    audio_trace_list = [0.0] * 10
    for epoch in range(len(traces)):
        if epoch == 0:
            k = 1.0
        else:
            tr1 = sum(audio_trace_list[-10:]) / 10
            tr2 = sum(audio_trace_list[-11:-1]) / 10
            k = (tr1 - tr2) / tr1
        ours.append(window_slope(traces[:epoch], 10))
        ref.append(k)
        audio_trace_list.append(traces[epoch])
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    b = setup("inforeg", model)
    b.on_epoch_start(model, 0)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.add_(0.05)
    out = forward(model, batch)
    loss, logs = b.loss(model, batch, out)
    model.zero_grad()
    loss.backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    b.after_backward(model, 0)
    y = batch["labels"]
    score_a, score_v = true_prob_sum(out.unimodal_logits["audio"], y), true_prob_sum(out.unimodal_logits["visual"], y)
    beta = 0.95 * math.exp(math.tanh(float(score_a - score_v))) if score_a > score_v else 0.0
    beta2 = 0.1 * math.exp(math.tanh(float(score_v - score_a))) if score_a < score_v else 0.0
    ours += [logs["inforeg_beta_audio"], logs["inforeg_beta_visual"]]
    ref += [beta, beta2]
    ours_t, ref_t = [torch.tensor(ours, dtype=torch.float64)], [torch.tensor(ref, dtype=torch.float64)]
    for m, bm in (("audio", beta), ("visual", beta2)):
        for n, p in model.modality_parameters(m):
            g = raw[n] + bm * (p.detach() - anchor[n])
            if p.dim() >= 2:
                ours_t.append(b.fisher[m][n].double().flatten())
                ref_t.append((g * g).double().flatten())
    return torch.cat(ours_t), torch.cat(ref_t)


def row_agm():
    """lihong2303/AGM_ICCV2023@5a65542c70b1c7c15c5df291e77fa9cf2bbb9549:run/CREMAD_main.py (`train`):
    Shapley logits from zero-padded forwards, mean -log p(y), ratio_a = exp(s_v - s_a), target ratio from
    the running scores, coeff = exp(alpha min(optimal - ratio, 10))."""
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    b = setup("agm", model)
    b.score_sum, b.steps = torch.tensor([2.4, 1.8], dtype=torch.float64), 2
    out = forward(model, batch)
    _, logs = b.loss(model, batch, out)
    y = batch["labels"]
    with torch.no_grad():
        f = lambda keep: model(**{m: batch[m] if m in keep else torch.zeros_like(batch[m]) for m in MODS}).logits  # noqa: E731
        out_a = 0.5 * (f({"audio", "visual"}) - f({"visual"}) + f({"audio"}))
        out_v = 0.5 * (f({"audio", "visual"}) - f({"audio"}) + f({"visual"}))
    score_a = sum(-torch.log(torch.softmax(out_a, 1)[k][y[k]]) for k in range(len(y))) / len(y)
    score_v = sum(-torch.log(torch.softmax(out_v, 1)[k][y[k]]) for k in range(len(y))) / len(y)
    train_a, train_v = 1.2, 0.9
    ratio_a, ratio_v = math.exp(score_v.item() - score_a.item()), math.exp(score_a.item() - score_v.item())
    opt_a, opt_v = math.exp(train_v - train_a), math.exp(train_a - train_v)
    ref = [math.exp(1.5 * min(opt_a - ratio_a, 10)), math.exp(1.5 * min(opt_v - ratio_v, 10))]
    return torch.tensor([logs["agm_coeff_audio"], logs["agm_coeff_visual"]], dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)


def row_lfm():
    """njustkmg/NeurIPS24-LFM@ad44fa09fee471c9267a7cba526b222c54d45493:Crema_epoch_learnable.py: `Alignment`
    with F.kl_div(p.log(), m), loss 2 (cls_k[0] CE + cls_k[1] align) with cls_k = [0.05, 0.95] at start
    (the fused CE is taken on the model's fused logits here, see the docstring)."""
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    b = setup("lfm", model)
    out = forward(model, batch)
    loss, _ = b.loss(model, batch, out)
    p, q = (torch.softmax(out.unimodal_logits[m], -1) for m in MODS)
    mix = 0.5 * p + 0.5 * q
    align = 0.5 * (F.kl_div(p.log(), mix, reduction="batchmean") + F.kl_div(q.log(), mix, reduction="batchmean"))
    expected = 2 * (0.05 * F.cross_entropy(out.logits, batch["labels"]) + 0.95 * align)
    return loss.reshape(1), expected.reshape(1)


def row_greedy():
    """nyukat/greedy_multimodal_learning@a190e03755bd8d0883b2c5c0cd7921d2561ce2ee:src/callbacks.py
    (`Bias_Mitigation_Strong.compute_BDR`, `on_backward_end`): name-based main / bypass split with the shared
    squeeze on both bypasses, ratio of sums, speeds accumulated, |d| > 0.01 after epoch 2."""
    model = model_for(arch="mmtm")
    b = setup("greedy", model, ctx_for(epoch=2))
    gen = torch.Generator().manual_seed(4)
    state = {"M_bypass": [0.0, 0.0], "M_main": [0.0, 0.0]}
    ours, ref = [], []
    for step in range(3):
        for n, p in model.named_parameters():
            scale = 3.0 if ("visual" in n and "mmtm" in n) else 1.0
            p.grad = scale * torch.randn(p.shape, generator=gen) * 0.01
        before = b.curating
        b.after_backward(model, step)
        if before is not None:
            continue
        wn_main, wn_bypass, gn_main, gn_bypass = [0.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2
        for name, parameter in model.named_parameters():
            wn, gn = float((parameter.detach() ** 2).sum()), float((parameter.grad ** 2).sum())
            if "mmtm" in name:
                shared = True
                for ind, modal in enumerate(MODS):
                    if modal in name:
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
                        shared = False
                if shared:
                    for ind in range(2):
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
            else:
                for ind, modal in enumerate(MODS):
                    if modal in name:
                        wn_main[ind] += wn
                        gn_main[ind] += gn
        for i in range(2):
            state["M_bypass"][i] += gn_bypass[i] / wn_bypass[i]
            state["M_main"][i] += gn_main[i] / wn_main[i]
        bdr = [math.log10(state["M_bypass"][i] / state["M_main"][i]) for i in range(2)]
        d = bdr[0] - bdr[1]
        caring = None if abs(d) <= 0.01 else (1 if d < 0 else 0)
        ours += [b.main[m] for m in MODS] + [b.bypass[m] for m in MODS] + [b.last_bdr[m] for m in MODS]
        ours.append(-1.0 if b.curating is None else float(MODS.index(b.curating)))
        ref += state["M_main"] + state["M_bypass"] + bdr + [-1.0 if caring is None else float(caring)]
    return torch.tensor(ours, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)


def row_mla():
    """Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation@ab6c184579f9ff390e9c9b8216c9900c2a43545b:
    main.py (`calculate_gating_weights`, with the per-sample softmax of its commented `dim=1` line, the
    paper's per-input confidence): w_m = exp(max_H - H_m) / sum_k exp(max_H - H_k)."""
    from mmbalance_llm.models.shared_head import entropy_gates

    gen = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(8, C, generator=gen), 3 * torch.randn(8, C, generator=gen)
    ours = entropy_gates([z1, z2])
    ref = torch.zeros(8, 2)
    for i in range(8):
        ent = [-(torch.softmax(z[i], 0) * torch.log_softmax(z[i], 0)).sum() for z in (z1, z2)]
        top = max(ent)
        w = [torch.exp(top - e) for e in ent]
        ref[i] = torch.stack([w[0] / (w[0] + w[1]), w[1] / (w[0] + w[1])])
    return ours, ref


def row_reconboost():
    """huacong/ReconBoost@14ab57ac26e0ad7badb29c4e08ec4ca9d4bb0932:train.py: boosting_loss =
    -w1 (target log_softmax).mean(-1) + w2 (target softmax(out_join) log_softmax).mean(-1), + alpha MSE of
    detached softmaxes (`detach_reconcile: true`); README.md: 4 + 4 passes per stage."""
    from mmbalance_llm.balance.reconboost import boosting_loss

    gen = torch.Generator().manual_seed(3)
    logits = {m: torch.randn(8, C, generator=gen, requires_grad=True) for m in MODS}
    y = torch.arange(8) % C
    cfg = get_method("reconboost", detach_reconcile=True).config
    loss = boosting_loss(logits, "audio", "visual", y, cfg)
    (g_ours,) = torch.autograd.grad(loss, logits["audio"])
    out_obj, out_join = logits["audio"], logits["visual"]
    target = torch.zeros(8, C).scatter_(1, y.view(-1, 1), 1)
    boost = -5.0 * (target * out_obj.log_softmax(1)).mean(-1) + 1.0 * (target * out_join.detach().softmax(1) * out_obj.log_softmax(1)).mean(-1)
    ga = F.mse_loss(out_obj.detach().softmax(1), out_join.detach().softmax(1))
    ref_loss = (boost + 0.5 * ga).mean()
    (g_ref,) = torch.autograd.grad(ref_loss, out_obj)
    t = float(get_method("reconboost").config.t_epochs)
    return torch.cat([loss.reshape(1), g_ours.flatten(), torch.tensor([t])]), torch.cat([ref_loss.reshape(1), g_ref.flatten(), torch.tensor([4.0])])


def row_relearning():
    """GeWu-Lab/Diagnosing_Relearning_ECCV2024@025085ea82ed784c6ab6e5fb1b08bfe498dd0fc7:code/ours.py: reset
    when `epoch % reinit_epoch == 0 and epoch > 0`, at most reinit_num times; new = w init + (1 - w) current."""
    model = model_for()
    b = setup("relearning", model)
    b.diagnose = lambda _model: {m: {"purity_train": 0.9, "purity_val": 0.7, "alpha": math.tanh(3 * 0.2)} for m in MODS}
    init = {n: t.clone() for n, t in b.theta_init.items()}
    ours_epochs = []
    for epoch in range(90):
        done = b.resets_done
        if epoch == 20:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        b.on_epoch_end(model, epoch)
        if b.resets_done > done:
            ours_epochs.append(epoch)
        if epoch == 20:
            after = torch.cat([p.detach().flatten() for m in MODS for _, p in model.modality_parameters(m)])
    ref_epochs, flag = [], 0
    for epoch in range(90):
        if epoch % 20 == 0 and epoch > 0:
            flag += 1
            if flag <= 3:
                ref_epochs.append(epoch)
    w = math.tanh(3 * 0.2)
    expected = torch.cat([(w * init[n] + (1 - w) * before[n]).flatten() for m in MODS for n, _ in model.modality_parameters(m)])
    return torch.cat([torch.tensor(ours_epochs, dtype=torch.float32), after]), torch.cat([torch.tensor(ref_epochs, dtype=torch.float32), expected])


def row_amco():
    """GeWu-Lab/BalanceBenchmark@4c1482f:balancemm/models/avclassify_model.py (`unimodality_calculate`: the
    dependent modality's unimodal result is z_m * mask, the output their sum) and trainer/AMCo_trainer.py
    (loss = CE(output) + sum_m CE(unimodal_m)), given the same masks."""
    from mmbalance_llm.balance.amco import class_masks, dependent_modalities, mask_ratio

    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    ctx = ctx_for(step=5)
    ctx.total_steps = 10  # step 5 of 10: progress 0.5
    b = setup("amco", model, ctx)
    out = b.forward(model, batch)
    loss, _ = b.loss(model, batch, out)
    with torch.no_grad():
        plain = forward(model, batch)
    uni = {m: z for m, z in plain.unimodal_logits.items()}
    dep = dependent_modalities(uni, 0.5)
    gen = torch.Generator().manual_seed((0 * 1_000_003 + 5) * 64 + 0)
    masks = class_masks(dep, C, mask_ratio(0.5, 0.3), gen)
    masked = {m: uni[m] * masks[:, j] for j, m in enumerate(MODS)}
    y = batch["labels"]
    expected = F.cross_entropy(sum(masked.values()), y) + sum(F.cross_entropy(z, y) for z in masked.values())
    return loss.detach().reshape(1), expected.reshape(1)


def row_mbsd():
    """GeWu-Lab/BalanceBenchmark@4c1482f:balancemm/trainer/MBSD_trainer.py (`training_step`, M = 2): the
    logit term w . (1/C) sum (z_a - z_b)^2 / B with w[i] = max - min true-class probability (when either
    branch is right) written into a tensor, so w carries gradient; value and gradient."""
    from mmbalance_llm.balance.mbsd import pair_terms

    gen = torch.Generator().manual_seed(5)
    za, zb = (torch.randn(8, C, generator=gen, requires_grad=True) for _ in range(2))
    y = torch.arange(8) % C
    rs, _ = pair_terms(za, zb, y)
    g_ours = torch.autograd.grad(rs, [za, zb])
    pa, pb = torch.softmax(za, 1), torch.softmax(zb, 1)
    loss_rs = 1 / C * torch.sum((za - zb) ** 2, dim=1)
    w = torch.zeros(8)
    pred_a, pred_b = pa.argmax(-1), pb.argmax(-1)
    for i in range(8):
        if pred_a[i] == y[i] or pred_b[i] == y[i]:
            w[i] = max(pa[i][y[i]], pb[i][y[i]]) - min(pa[i][y[i]], pb[i][y[i]])
    ref = (torch.mm(w.reshape(1, -1), loss_rs.reshape(-1, 1)) / 8).squeeze()
    g_ref = torch.autograd.grad(ref, [za, zb])
    return torch.cat([rs.reshape(1), *[g.flatten() for g in g_ours]]), torch.cat([ref.reshape(1), *[g.flatten() for g in g_ref]])


def row_cml():
    """GeWu-Lab/BalanceBenchmark@4c1482f:balancemm/trainer/CML_trainer.py (`training_step`, M = 2,
    `conf_loss`): (CE(out) + CE(out - z_removed + b/2)) / 2 + lam max(0, sum(conf_p - conf_s))."""
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    b = setup("cml", model)
    b.order = ["visual", "audio"]  # BB pops the last entry of its shuffled list: remove visual first
    out = forward(model, batch)
    loss, _ = b.loss(model, batch, out)
    y, bias = batch["labels"], model.fusion.classifier.bias
    out_s = out.logits
    out_p = out_s - out.unimodal_logits["visual"] + bias / 2
    conf_s, conf_p = torch.softmax(out_s, 1).max(1).values, torch.softmax(out_p, 1).max(1).values
    expected = (F.cross_entropy(out_s, y) + F.cross_entropy(out_p, y)) / 2 + 0.1 * max(0, torch.sub(conf_p, conf_s).sum())
    return loss.reshape(1), torch.as_tensor(expected).reshape(1)


def row_gblending():
    """Paper (Wang et al., CVPR 2020, Eq. 5-6): w_k = |dG_k / dO_k^2| / Z, dG = L^V_n - L^V_{n+N},
    dO = (L^V_{n+N} - L^T_{n+N}) - (L^V_n - L^T_n)."""
    from mmbalance_llm.balance.gblending import blend_weights

    stats = {"__fused__": (1.2, 1.3, 0.6, 0.9), "audio": (1.3, 1.35, 0.9, 1.1), "visual": (1.38, 1.39, 1.2, 1.3)}
    ours = blend_weights(stats)
    raw = {}
    for k, (lt0, lv0, lt1, lv1) in stats.items():
        dg, do = lv0 - lv1, (lv1 - lt1) - (lv0 - lt0)
        raw[k] = abs(dg / do ** 2)
    z = sum(raw.values())
    return torch.tensor([ours[k] for k in stats]), torch.tensor([raw[k] / z for k in stats])


def row_mmcosine():
    """GeWu-Lab/MMCosine_ICASSP23@00ba0a9cbd9b866b5017e972a1266d7b664bf86e:models/fusion_modules.py: per
    modality scale * normalize(h) @ normalize(W_m)^T, output the sum (no bias)."""
    from mmbalance_llm.balance.mmcosine import apply_cosine_head

    model, ds = model_for().double(), dataset()
    apply_cosine_head(model, 10.0)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch_of(ds).items()}
    out = forward(model, batch)
    w = model.fusion.classifier.weight
    wa, wv = w[:, :5], w[:, 5:]
    ha, hv = out.features["audio"], out.features["visual"]
    ref = 10.0 * (F.normalize(ha, dim=1) @ F.normalize(wa, dim=1).t()) + 10.0 * (F.normalize(hv, dim=1) @ F.normalize(wv, dim=1).t())
    return out.logits.detach(), ref.detach()


def row_mmpareto():
    """GeWu-Lab/MMPareto_ICML2024@a339db39cc25b157df376b50bb894917dc6c01d6:code/MMPareto.py: (1/2, 1/2) when
    cos > 0 else the 2-task min-norm weights; per tensor new = 2 (k0 g_mm + k1 g_u), rescaled to
    ||g_mm + g_u|| when larger, times gamma (`rescale: tensor`)."""
    from mmbalance_llm.balance.mmpareto import integrate

    gen = torch.Generator().manual_seed(6)
    g_mm = [torch.randn(3, 4, generator=gen), torch.randn(4, generator=gen)]
    g_u = [-0.8 * g_mm[0] + 0.3 * torch.randn(3, 4, generator=gen), torch.randn(4, generator=gen)]
    ours, _, _ = integrate(g_mm, g_u, 1.5, per_tensor=True)
    a, b = torch.cat([g.flatten() for g in g_mm]).double(), torch.cat([g.flatten() for g in g_u]).double()
    if F.cosine_similarity(a, b, dim=0) > 0:
        k = (0.5, 0.5)
    else:  # MinNormSolver._min_norm_element_from2
        v11, v12, v22 = float(a @ a), float(a @ b), float(b @ b)
        gamma = 0.999 if v12 >= v11 else (0.001 if v12 >= v22 else -1.0 * (v12 - v22) / (v11 + v22 - 2 * v12))
        k = (gamma, 1 - gamma)
    ref = []
    for gm, gu in zip(g_mm, g_u):
        three_norm = torch.norm(gm + gu)
        new = 2 * k[0] * gm + 2 * k[1] * gu
        diff = three_norm / torch.norm(new)
        ref.append((diff * new * 1.5 if diff > 1 else new * 1.5).flatten())
    return torch.cat([t.flatten().double() for t in ours]), torch.cat(ref).double()


def row_modality_valuation():
    """GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation@7ed12b07ee7d233aa835089185c909aaa3ff6b1e:
    code/datasets/dataloader.py: difference = |gap_a - gap_v| / 3 * 2 * alpha, resample_num =
    int(difference * length), each copy keeps the modality with the larger gap."""
    from mmbalance_llm.balance.modality_valuation import modality_copies

    c = torch.tensor([0.7, 0.25], dtype=torch.float64)
    copies, d = modality_copies(c, MODS, 300, 1.0, torch.Generator().manual_seed(0))
    gap_a, gap_v = 1 - 0.7, 1 - 0.25
    diff = abs(gap_a - gap_v) / 3 * 2 * 1.0
    keep = "audio" if gap_a > gap_v else "visual"
    ours = [d, len(copies), float(all(k == (keep,) for _, k in copies))]
    return torch.tensor(ours, dtype=torch.float64), torch.tensor([diff, int(diff * 300), 1.0], dtype=torch.float64)


def row_sample_valuation():
    """GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation@7ed12b07ee7d233aa835089185c909aaa3ff6b1e:
    code/datasets/dataloader.py: 1 copy if 0.4 < c < 1, 2 if -0.1 < c < 0.4, 3 if c < -0.1, per modality."""
    from mmbalance_llm.balance.sample_valuation import copies_for

    b = get_method("sample_valuation")
    c = b.config
    score = torch.tensor([[1.0, 0.5], [0.0, -0.5], [1.5, 0.5], [-0.5, 1.0], [0.5, 0.0]])
    ours = torch.zeros(5, 2)
    for i, (m,) in copies_for(score, MODS, c.high, c.low1, c.low2):
        ours[i, MODS.index(m)] += 1
    ref = torch.zeros(5, 2)
    for i in range(5):
        for j in range(2):
            contrib = float(score[i, j])
            ref[i, j] = 1 if 0.4 < contrib < 1 else 2 if -0.1 < contrib < 0.4 else 3 if contrib < -0.1 else 0
    return ours, ref


def row_unimodal_aux():
    """Paper only: L = CE(z) + weight * sum_m CE(z_m) on the split head."""
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    out = forward(model, batch)
    loss, _ = setup("unimodal_aux", model).loss(model, batch, out)
    y = batch["labels"]
    return loss.reshape(1), (F.cross_entropy(out.logits, y) + sum(F.cross_entropy(z, y) for z in out.unimodal_logits.values())).reshape(1)


def row_ume():
    """Paper only (Du et al., ICML 2023, UME): L = sum_m CE(z_m), no fused loss."""
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    out = forward(model, batch)
    loss, _ = setup("ume", model).loss(model, batch, out)
    y = batch["labels"]
    return loss.reshape(1), sum(F.cross_entropy(z, y) for z in out.unimodal_logits.values()).reshape(1)


def row_umt():
    """GeWu-Lab/BalanceBenchmark@4c1482f:balancemm/trainer/UMT_trainer.py: CE(out) + sigma sum_m MSE(h_m,
    teacher_m(x_m)), sigma 10."""
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    b = get_method("umt")
    b.ctx = ctx_for()
    teacher = model_for(seed=9)
    b.teachers = {m: teacher for m in MODS}
    out = forward(model, batch)
    loss, _ = b.loss(model, batch, out)
    y = batch["labels"]
    distill = 0.0
    for m in MODS:
        with torch.no_grad():
            t = teacher(**{k: batch[k] if k == m else torch.zeros_like(batch[k]) for k in MODS}).features[m]
        distill = distill + ((out.features[m] - t) ** 2).mean()
    return loss.reshape(1), (F.cross_entropy(out.logits, y) + 10.0 * distill).reshape(1)


def row_none():
    """Paper only: CE(z)."""
    model, ds = model_for(), dataset()
    batch = batch_of(ds)
    out = forward(model, batch)
    loss, _ = setup("none", model).loss(model, batch, out)
    return loss.reshape(1), F.cross_entropy(out.logits, batch["labels"]).reshape(1)


def row_rollingq():
    """GeWu-Lab/RollingQ_ICML2025@23f116282b1603da690ae4d5dc43d188c1bcc18d:method.py (`set_rotary_matrix`):
    alpha = (1 + tanh(-sigma AIR)) / 2, target = alpha mu_a/|mu_a| + (1 - alpha) mu_v/|mu_v| scaled to |q|,
    and utils/utils.py (`compute_rotation_matrix`): W = U V^T of svd(outer(Y, X)), det +1, W q^ = t^."""
    from mmbalance_llm.models.rolling_query import balanced_target, rotation_to

    gen = torch.Generator().manual_seed(7)
    mu = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    q = torch.randn(6, generator=gen, dtype=torch.float64)
    a = torch.tensor([0.6, 0.15], dtype=torch.float64)
    sigma = 1.5
    ours_t = balanced_target(mu, a, sigma, q.norm())
    ours_rq = rotation_to(q, ours_t, "svd") @ q
    air = float(a[0] - a[1])
    alpha = (1 + math.tanh(-sigma * air)) / 2
    target = alpha * mu[0] / mu[0].norm() + (1 - alpha) * mu[1] / mu[1].norm()
    target = target * q.norm() / target.norm()
    x, y = q / q.norm(), target / target.norm()
    u, _, vt = torch.linalg.svd(torch.outer(y, x))
    w = u @ vt
    if torch.det(w) < 0:
        u[:, -1] = -u[:, -1]
        w = u @ vt
    return torch.cat([ours_t, ours_rq]), torch.cat([target, w @ q])


ROWS = {
    "agm": row_agm, "amco": row_amco, "cml": row_cml, "gblending": row_gblending, "greedy": row_greedy,
    "inforeg": row_inforeg, "lfm": row_lfm, "mbsd": row_mbsd, "mla": row_mla, "mmcosine": row_mmcosine,
    "mmpareto": row_mmpareto, "modality_valuation": row_modality_valuation, "none": row_none, "ogm": row_ogm,
    "ogm_ge": row_ogm_ge, "opm": row_opm, "pmr": row_pmr, "reconboost": row_reconboost,
    "relearning": row_relearning, "rollingq": row_rollingq, "sample_valuation": row_sample_valuation,
    "ume": row_ume, "umt": row_umt,
    "unimodal_aux": row_unimodal_aux,
}
NO_ROW: dict = {  # method -> why its math is pinned elsewhere
    "commit": "task sft, paper only; kappa, the factors and the regulariser are pinned in tests/test_mllm_commit.py",
    "mllm_contrast": "task sft; the hinge and zero weight are pinned in tests/test_mllm_balance.py",
    "mllm_ogm": "task sft; OGM's coefficient rule and the exact token-masked scaling are pinned in "
                "tests/test_mllm_balance.py",
}


def test_every_registered_method_has_a_row_or_a_reason():
    missing = set(available_methods()) - set(ROWS) - set(NO_ROW)
    assert not missing, f"methods without a fidelity row: {sorted(missing)}"
    assert not set(ROWS) & set(NO_ROW) and set(ROWS) | set(NO_ROW) <= set(available_methods())


@pytest.mark.parametrize("method", sorted(ROWS))
def test_matches_the_followed_code(method):
    ours, ref = ROWS[method]()
    ours, ref = torch.as_tensor(ours).detach().double(), torch.as_tensor(ref).detach().double()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
