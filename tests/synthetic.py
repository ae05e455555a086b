"""Synthetic click logs with planted user segments, for checking that clustering recovers them.

Each group browses the same pages with its own first-order transition rule (a random sparse
transition matrix per group), so only the page *order* tells groups apart; the user embedding is
the group's centre plus noise, so k-means with too many clusters splits groups into sub-clusters.
"""

import numpy as np
import polars as pl

from hetlm.tokenizer import BOS_ID, EOS_ID, SPECIALS


def planted_samples(n_groups=3, users_per_group=40, sessions=4, session_len=6, n_pages=20, noise=0.35,
                    dim=16, seed=0):
    rng = np.random.default_rng(seed)
    pages = [f"page_{i}" for i in range(n_pages)]
    # Each page has 2 likely successors per group, drawn independently per group.
    succ = rng.integers(0, n_pages, size=(n_groups, n_pages, 2))
    centres = rng.normal(size=(n_groups, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows, groups, z = [], [], []
    for g in range(n_groups):
        for u in range(users_per_group):
            sess = []
            for _ in range(sessions):
                p = rng.integers(n_pages)
                s = [p]
                for _ in range(session_len - 1):
                    p = succ[g, p, rng.integers(2)]
                    s.append(p)
                sess.append(s)
            ids = [[BOS_ID, *(len(SPECIALS) + np.array(s)).tolist(), EOS_ID] for s in sess]
            rows.append({
                "user": f"g{g}u{u}",
                "history": [[pages[i] for i in s] for s in sess[:-1]],
                "target": [pages[i] for i in sess[-1]],
                "input_ids": [t for s in ids[:-1] for t in s],
                "target_ids": ids[-1],
            })
            groups.append(g)
            v = centres[g] + noise * rng.normal(size=dim)
            z.append(v / np.linalg.norm(v))
    return pl.DataFrame(rows), np.array(groups), np.array(z, dtype=np.float32), len(SPECIALS) + n_pages
