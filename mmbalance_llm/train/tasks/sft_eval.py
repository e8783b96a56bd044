"""SFT evaluation: loss on answer tokens and answer accuracy, overall and per `needs` (the media an item
needs), summed over processes so every rank reports the numbers of the whole split.

`options` scores every answer option by the summed log-probability of its tokens (records need `options` +
`answer`); `generate` compares the first word of a greedy reply with `answer` (or the reference reply).
Encodings are made once per split and kept, so repeated evaluations only run the model."""
from __future__ import annotations

import torch

from mmbalance_llm.config import RecipeError


def chunks(xs, n):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def to_device(batch: dict, device, dtype) -> dict:
    return {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)) for k, v in batch.items()}


def first_word(text: str) -> str:
    return (str(text).strip().split() or [""])[0].strip(".,!?").lower()


def eval_groups(record: dict) -> list:
    """The accuracy groups a record counts in: its `needs` ("image", "audio", "text"; "all" when absent) and,
    for a media item of a set generated with a text prior (its `cue`: "prior" when the answer is the question's
    prior answer, "nonprior" when only the medium gives it), also `<needs>_<cue>`: `accuracy_image_nonprior` is
    the accuracy on the items that need the image."""
    needs = str(record.get("needs", "all"))
    groups = [needs]
    if record.get("cue") in ("prior", "nonprior") and needs not in ("text", "all"):
        groups.append(f"{needs}_{record['cue']}")
    return groups

class SFTEvaluator:
    def __init__(self, collator, eval_cfg, batch_size: int, dtype):
        self.collator, self.cfg, self.batch_size, self.dtype = collator, eval_cfg, batch_size, dtype
        self._encoded: dict = {}

    def _encode(self, split: str, recs: list) -> dict:
        """Per chunk of records: the padded loss batch and the answer-scoring inputs (made once)."""
        if split in self._encoded:
            return self._encoded[split]
        c, out = self.collator, []
        for group in chunks(recs, self.batch_size):
            media = [c._media_tokens(r, f"sample id={r.get('id')}") for r in group]  # once per record
            loss_batch = c.pad([c.encode(r, media=m) for r, m in zip(group, media)])
            if self.cfg.accuracy == "options":
                encs, owner = [], []
                for i, (r, m) in enumerate(zip(group, media)):
                    if not r.get("options") or r.get("answer") is None:
                        raise RecipeError(f"eval.accuracy=options needs 'options' and 'answer' in sample "
                                          f"id={r.get('id')}; use eval.accuracy=generate")
                    for opt in r["options"]:
                        encs.append(c.encode(r, answer=opt, media=m))
                        owner.append(i)
                score = [c.pad(e) for e in chunks(encs, self.batch_size)], owner
            else:
                prompt = c.pad([c.encode(r, add_answer=False, media=m) for r, m in zip(group, media)],
                               padding_side="left")
                prompt.pop("labels")
                score = prompt
            out.append((group, loss_batch, score))
        self._encoded[split] = out
        return out

    @torch.no_grad()
    def evaluate(self, model, split: str, recs: list, needs_keys: list, accelerator) -> dict:
        """`recs`: this rank's share of the split; `needs_keys`: every `needs` value of the whole split."""
        device = accelerator.device
        was_training = model.training
        model.eval()
        loss_sum = n_tok = 0.0
        correct = total = 0
        per = {k: [0, 0] for k in needs_keys}
        for group, loss_batch, score in self._encode(split, recs):
            b = to_device(loss_batch, device, self.dtype)
            n = int((b["labels"][:, 1:] != -100).sum())
            loss_sum += float(model(**b).loss) * n
            n_tok += n
            hits = self._options(model, group, score, device) if self.cfg.accuracy == "options" \
                else self._generate(model, group, score, device)
            for r, h in zip(group, hits):
                correct += h
                total += 1
                for k in eval_groups(r):
                    per[k][0] += h
                    per[k][1] += 1
        if was_training:
            model.train()
        keys = list(needs_keys)
        t = torch.tensor([loss_sum, n_tok, correct, total] + [v for k in keys for v in per[k]], dtype=torch.float64,
                         device=device)
        if accelerator.num_processes > 1:
            t = accelerator.reduce(t, reduction="sum")
        t = t.tolist()
        out = {"loss": t[0] / max(t[1], 1), "accuracy": t[2] / max(t[3], 1), "n": int(t[3])}
        for i, k in enumerate(keys):
            c, n = t[4 + 2 * i], t[5 + 2 * i]
            if n:
                out[f"accuracy_{k}"] = c / n
        return out

    def _options(self, model, group, score, device) -> list:
        batches, owner = score
        scores = []
        for pb in batches:
            b = to_device(pb, device, self.dtype)
            # labels go into the forward too: MokA reads them to keep the option tokens out of the question keys
            logits = model(**b).logits[:, :-1].float()
            tgt = b["labels"][:, 1:]
            lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
            scores += (lp * (tgt != -100)).sum(1).tolist()
        best: dict = {}
        for i, (o, s) in enumerate(zip(owner, scores)):
            k = i - owner.index(o)
            if o not in best or s > best[o][1]:
                best[o] = (k, s)
        return [int(group[o]["options"][best[o][0]] == group[o]["answer"]) for o in range(len(group))]

    def _generate(self, model, group, prompt, device) -> list:
        b = to_device(prompt, device, self.dtype)
        gen = model.generate(**b, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
        texts = self.collator.tok.batch_decode(gen[:, b["input_ids"].shape[1]:], skip_special_tokens=True)
        hits = []
        for r, text in zip(group, texts):
            ref = r.get("answer") or r["messages"][-1]["content"]
            hits.append(int(first_word(text) == first_word(ref)))
        return hits
