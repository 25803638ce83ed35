//! A synthetic catalogue for benchmarks: the real catalogue grown to any size, so the index,
//! retrieval and the whole pipeline can be measured at 1M items with the real models.
//!
//! Item `i` beyond the real `N` copies the metadata and ranking features of real item
//! `a = (i - 1) % N + 1`; its embedding blends `a`'s with a random other real item `b`
//! (`w·e_a + (1 − w)·e_b`, `w` uniform in [0.5, 1]) plus Gaussian noise (per dimension
//! `noise`), renormalised. New titles resemble mixtures of existing ones, so the synthetic
//! items fill the space between real items instead of forming 1,682 isolated clumps.

use std::collections::HashMap;

use crate::model::{Catalog, Item, Matrix, ModelData};

/// Deterministic xorshift64* + Box-Muller: the bench must be repeatable and dependency-free.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn gaussian(&mut self) -> f32 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// Ids of synthetic items start here, far above any real catalogue id.
pub const SYNTHETIC_ID_BASE: i64 = 1_000_000_000;

/// Grows `data` and its item embeddings `emb` to `n` items (no-op when `n <= N`).
pub fn expand(
    data: &ModelData,
    emb: &Matrix,
    n: usize,
    noise: f32,
    seed: u64,
) -> (ModelData, Matrix) {
    let real = data.catalog.len();
    if n <= real {
        return (data.clone(), emb.clone());
    }
    let mut rng = Rng(seed | 1);
    let d = emb.cols;
    let fi = data.item_features.cols;
    let mut items = Vec::with_capacity(n + 1);
    let mut by_id = HashMap::with_capacity(n);
    let mut e = Vec::with_capacity((n + 1) * d);
    let mut f = Vec::with_capacity((n + 1) * fi);
    items.push(Item::default());
    e.extend_from_slice(emb.row(0));
    f.extend_from_slice(data.item_features.row(0));
    for i in 1..=n {
        let src = (i - 1) % real + 1;
        let mut item = data.catalog.items[src].clone();
        let mut row = emb.row(src).to_vec();
        if i > real {
            item.item_id = SYNTHETIC_ID_BASE + i as i64;
            let other = ((rng.next_f64() * real as f64) as usize).min(real - 1) + 1;
            let w = 0.5 + 0.5 * rng.next_f64() as f32;
            for (x, y) in row.iter_mut().zip(emb.row(other)) {
                *x = w * *x + (1.0 - w) * y + noise * rng.gaussian();
            }
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|x| *x /= norm);
        }
        by_id.insert(item.item_id, i as u32);
        items.push(item);
        e.extend_from_slice(&row);
        f.extend_from_slice(data.item_features.row(src));
    }
    let mut out = data.clone();
    out.catalog = Catalog {
        items,
        by_id,
        genre_names: data.catalog.genre_names.clone(),
    };
    out.item_features = Matrix {
        rows: n + 1,
        cols: fi,
        data: f,
    };
    (
        out,
        Matrix {
            rows: n + 1,
            cols: d,
            data: e,
        },
    )
}
