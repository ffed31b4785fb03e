"""Re-score saved CalTrain fingerprints (`bench_caltrain.py --dump DIR`) with the current detectors.

Run: `python benchmarks/caltrain_replay.py DIR/backdoor.npz DIR/mislabel.npz`. No training: the
trace modes (`cluster`, `nearest`) on a backdoor dump, the label audit and cleanlab on a mislabel
dump, each printed as one JSON line. Used to iterate on detectors offline; every figure it prints
can be reproduced by rerunning the benchmark with the same seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_caltrain import cluster_mode, label_audit_figures  # noqa: E402

from enclaveml.train import detectors  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        d = np.load(path)
        fps, labels = torch.from_numpy(d["fps"]), torch.from_numpy(d["labels"]).long()
        pids = [int(p).to_bytes(32, "big") for p in d["participant"]]
        hashes = [i.to_bytes(32, "big") for i in range(len(pids))]
        poisoned = torch.from_numpy(d["poisoned"]).bool()
        mal = {int(m).to_bytes(32, "big").hex() for m in d["malicious"]}
        q, ql = torch.from_numpy(d["qfps"]), torch.from_numpy(d["qlabels"]).long()
        out: dict = {"dump": path, "poisoned": int(poisoned.sum()), "queries": len(ql)}
        if Path(path).stem == "backdoor":
            out["cluster"] = cluster_mode(q, ql, fps, labels, hashes, pids, poisoned, mal, 10)
            m = detectors.get("knn-trace", k=10).flag(fps, labels, detectors.Queries(q, ql))
            p, r = detectors.precision_recall(m, poisoned)
            out["nearest"] = {"precision": round(p, 4), "recall": round(r, 4)}
        else:
            out["label_audit"] = label_audit_figures(fps, labels, pids, poisoned, mal, 0)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
