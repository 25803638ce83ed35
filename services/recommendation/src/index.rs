//! Candidate retrieval over the item embeddings: an HNSW graph (`hnsw_rs`) for speed, and
//! exact search, which is both the fallback (`index = "exact"`, or too few candidates left
//! after filters) and the reference the ANN recall is measured against.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;

/// `1 - dot` for unit vectors, clamped at 0. `anndists`' own `DistDot` asserts `dot <= 1`,
/// which rounding breaks for a vector against itself: a panic in the serving path.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnitDot;

impl Distance<f32> for UnitDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

use crate::model::Matrix;

/// HNSW build and search parameters.
#[derive(Debug, Clone, Copy)]
pub struct HnswParams {
    /// Neighbours kept per node and layer (M).
    pub m: usize,
    /// Candidate list size while building (quality of the graph).
    pub ef_construction: usize,
    /// Minimum candidate list size while searching; the effective value is at least `k`.
    pub ef_search: usize,
}

/// The item index: row `i` of the embedding matrix is item index `i`; row 0 (padding) is never
/// returned.
pub struct ItemIndex {
    hnsw: Option<Hnsw<'static, f32, UnitDot>>,
    ef_search: usize,
}

/// A scored item: (item index, cosine similarity).
pub type Scored = (u32, f32);

impl ItemIndex {
    /// Builds the HNSW graph over rows `1..` of `emb` (in parallel on rayon's pool), or no
    /// graph at all when `params` is `None` (exact search only).
    pub fn build(emb: &Matrix, params: Option<HnswParams>) -> Self {
        let Some(p) = params else {
            return Self {
                hnsw: None,
                ef_search: 0,
            };
        };
        let n = emb.rows.saturating_sub(1);
        let hnsw = Hnsw::<f32, UnitDot>::new(p.m, n.max(1), 16, p.ef_construction, UnitDot);
        let data: Vec<(&[f32], usize)> = (1..emb.rows).map(|i| (emb.row(i), i)).collect();
        hnsw.parallel_insert_slice(&data);
        Self {
            hnsw: Some(hnsw),
            ef_search: p.ef_search,
        }
    }

    /// A view of this index searching with another `ef_search` floor (the bench sweeps it).
    pub fn with_ef_search(&self, ef_search: usize) -> IndexView<'_> {
        IndexView {
            index: self,
            ef_search,
        }
    }

    /// Whether searches use the HNSW graph.
    pub fn is_approximate(&self) -> bool {
        self.hnsw.is_some()
    }

    /// The `k` items nearest to `query` (unit norm), most similar first.
    pub fn search(&self, emb: &Matrix, query: &[f32], k: usize) -> Vec<Scored> {
        self.search_ef(emb, query, k, self.ef_search)
    }

    fn search_ef(&self, emb: &Matrix, query: &[f32], k: usize, ef_search: usize) -> Vec<Scored> {
        match &self.hnsw {
            Some(h) => {
                let ef = ef_search.max(k);
                let mut out: Vec<Scored> = h
                    .search(query, k, ef)
                    .into_iter()
                    .map(|n| (n.d_id as u32, 1.0 - n.distance))
                    .collect();
                // The graph returns by distance already; a stable sort keeps that contract
                // explicit and tie order deterministic.
                out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                out
            }
            None => exact_search(emb, query, k, |_| true),
        }
    }
}

/// An [`ItemIndex`] with another search list size.
pub struct IndexView<'a> {
    index: &'a ItemIndex,
    ef_search: usize,
}

impl IndexView<'_> {
    /// As [`ItemIndex::search`].
    pub fn search(&self, emb: &Matrix, query: &[f32], k: usize) -> Vec<Scored> {
        self.index.search_ef(emb, query, k, self.ef_search)
    }
}

/// Min-heap entry (the worst kept item on top).
#[derive(PartialEq)]
struct Entry(f32, u32);

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap, we want the smallest score (then the largest
        // index) on top so that ties resolve to the lower index.
        other.0.total_cmp(&self.0).then(self.1.cmp(&other.1))
    }
}

/// Dot product of two equal-length slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Exact top-`k` by dot product over rows `1..` of `emb` that pass `keep`, best first.
pub fn exact_search(
    emb: &Matrix,
    query: &[f32],
    k: usize,
    keep: impl Fn(u32) -> bool,
) -> Vec<Scored> {
    let mut heap: BinaryHeap<Entry> = BinaryHeap::with_capacity(k + 1);
    if k == 0 {
        return Vec::new();
    }
    for i in 1..emb.rows {
        let idx = i as u32;
        if !keep(idx) {
            continue;
        }
        let s = dot(emb.row(i), query);
        if heap.len() < k {
            heap.push(Entry(s, idx));
        } else if let Some(worst) = heap.peek()
            && (s > worst.0 || (s == worst.0 && idx < worst.1))
        {
            heap.pop();
            heap.push(Entry(s, idx));
        }
    }
    let mut out: Vec<Scored> = heap.into_iter().map(|Entry(s, i)| (i, s)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

/// Share of `exact`'s items that `approx` also found.
pub fn recall(approx: &[Scored], exact: &[Scored]) -> f64 {
    if exact.is_empty() {
        return 1.0;
    }
    let found: std::collections::HashSet<u32> = approx.iter().map(|s| s.0).collect();
    exact.iter().filter(|s| found.contains(&s.0)).count() as f64 / exact.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random unit vectors (xorshift), row 0 zeros.
    fn unit_rows(n: usize, d: usize, seed: u64) -> Matrix {
        let mut s = seed;
        let mut data = vec![0.0; d];
        for _ in 0..n {
            let row: Vec<f32> = (0..d)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % 10_000) as f32 / 5_000.0 - 1.0
                })
                .collect();
            let norm = dot(&row, &row).sqrt();
            data.extend(row.iter().map(|x| x / norm));
        }
        Matrix {
            rows: n + 1,
            cols: d,
            data,
        }
    }

    #[test]
    fn exact_search_is_sorted_and_skips_padding_and_filtered() {
        let m = unit_rows(200, 8, 7);
        let q = m.row(5).to_vec();
        let top = exact_search(&m, &q, 10, |i| i != 9);
        assert_eq!(top[0].0, 5, "an item is its own nearest neighbour");
        assert!((top[0].1 - 1.0).abs() < 1e-5);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(top.iter().all(|(i, _)| *i != 0 && *i != 9));
    }

    #[test]
    fn hnsw_recall_at_100_is_high_on_random_vectors() {
        let m = unit_rows(5_000, 16, 11);
        let index = ItemIndex::build(
            &m,
            Some(HnswParams {
                m: 16,
                ef_construction: 200,
                ef_search: 200,
            }),
        );
        let mut total = 0.0;
        for q in 1..=20 {
            let query = m.row(q * 97).to_vec();
            total += recall(
                &index.search(&m, &query, 100),
                &exact_search(&m, &query, 100, |_| true),
            );
        }
        assert!(total / 20.0 >= 0.95, "recall@100 {}", total / 20.0);
    }
}
