//! Re-ranking of ranked candidates: diversity by maximal marginal relevance (MMR) and a
//! long-tail exposure floor; plus the exposure measures (coverage, Gini, long-tail share)
//! the service exports and the bench reports. Pure functions, no model.

/// A ranked candidate as re-ranking sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub index: u32,
    /// Ranker score (any scale).
    pub score: f32,
    pub long_tail: bool,
}

/// Picks `k` of `cands` by MMR. `lambda` is the diversity weight in [0, 1]:
/// each step takes the candidate maximising `(1 - λ)·rel(i) − λ·max_{j chosen} sim(i, j)`,
/// with `rel` the ranker score min-max scaled to [0, 1]. λ = 0 is the ranker's order; λ = 1
/// picks the most relevant item first and then each next item as unlike the chosen ones as
/// possible. Ties go to the more relevant candidate. Returns positions into `cands`.
pub fn mmr(
    cands: &[Candidate],
    k: usize,
    lambda: f32,
    sim: impl Fn(usize, usize) -> f32,
) -> Vec<usize> {
    let n = cands.len();
    let k = k.min(n);
    // Relevance order: position 0 is the most relevant.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| cands[b].score.total_cmp(&cands[a].score).then(a.cmp(&b)));
    if lambda <= 0.0 || k == 0 {
        order.truncate(k);
        return order;
    }
    let (lo, hi) = cands
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), c| {
            (l.min(c.score), h.max(c.score))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let rel: Vec<f32> = cands.iter().map(|c| (c.score - lo) / span).collect();
    let mut max_sim = vec![f32::NEG_INFINITY; n];
    let mut taken = vec![false; n];
    let mut chosen = Vec::with_capacity(k);
    for _ in 0..k {
        let mut best: Option<(usize, f32)> = None;
        for &i in &order {
            if taken[i] {
                continue;
            }
            let penalty = if chosen.is_empty() { 0.0 } else { max_sim[i] };
            let v = (1.0 - lambda) * rel[i] - lambda * penalty;
            // Strictly greater: earlier (more relevant) candidates win ties.
            if best.is_none_or(|(_, bv)| v > bv) {
                best = Some((i, v));
            }
        }
        let Some((pick, _)) = best else { break };
        taken[pick] = true;
        chosen.push(pick);
        for &i in &order {
            if !taken[i] {
                max_sim[i] = max_sim[i].max(sim(i, pick));
            }
        }
    }
    chosen
}

/// Makes at least `ceil(floor·k)` of `chosen` long-tail items when `cands` holds enough:
/// the lowest-placed head items in `chosen` are replaced, in place, by the best-scored
/// long-tail candidates not yet chosen. Returns how many were swapped in.
pub fn long_tail_floor(cands: &[Candidate], chosen: &mut [usize], floor: f32) -> usize {
    let k = chosen.len();
    let need = (floor.clamp(0.0, 1.0) * k as f32).ceil() as usize;
    let have = chosen.iter().filter(|&&i| cands[i].long_tail).count();
    if have >= need {
        return 0;
    }
    let mut pool: Vec<usize> = (0..cands.len())
        .filter(|i| cands[*i].long_tail && !chosen.contains(i))
        .collect();
    pool.sort_by(|&a, &b| cands[b].score.total_cmp(&cands[a].score).then(a.cmp(&b)));
    let mut pool = pool.into_iter();
    let mut swapped = 0;
    for slot in (0..k).rev() {
        if have + swapped >= need {
            break;
        }
        if cands[chosen[slot]].long_tail {
            continue;
        }
        match pool.next() {
            Some(lt) => {
                chosen[slot] = lt;
                swapped += 1;
            }
            None => break,
        }
    }
    swapped
}

/// Jaccard similarity of two genre bitmasks (1 when both are empty).
pub fn genre_jaccard(a: u64, b: u64) -> f32 {
    let union = (a | b).count_ones();
    if union == 0 {
        1.0
    } else {
        (a & b).count_ones() as f32 / union as f32
    }
}

/// Gini coefficient of non-negative exposure counts over the whole catalogue (0 = every item
/// equally exposed, → 1 = all exposure on one item). 0 when nothing was exposed.
pub fn gini(counts: &[u64]) -> f64 {
    let n = counts.len();
    let total: u64 = counts.iter().sum();
    if n == 0 || total == 0 {
        return 0.0;
    }
    let mut sorted = counts.to_vec();
    sorted.sort_unstable();
    let weighted: f64 = sorted
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as f64 + 1.0) * x as f64)
        .sum();
    2.0 * weighted / (n as f64 * total as f64) - (n as f64 + 1.0) / n as f64
}

/// Exposure summary of a set of served lists.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExposureStats {
    /// Distinct items served / catalogue size.
    pub coverage: f64,
    /// Gini of item exposure counts over the catalogue.
    pub gini: f64,
    /// Share of served slots that were long-tail items.
    pub long_tail_share: f64,
}

/// Exposure counts per item index (`counts[0]` is the padding row and ignored) plus the number
/// of served long-tail slots and all slots.
pub fn exposure_stats(counts: &[u64], long_tail_slots: u64, slots: u64) -> ExposureStats {
    let real = counts.get(1..).unwrap_or(&[]);
    let distinct = real.iter().filter(|&&c| c > 0).count();
    ExposureStats {
        coverage: if real.is_empty() {
            0.0
        } else {
            distinct as f64 / real.len() as f64
        },
        gini: gini(real),
        long_tail_share: if slots == 0 {
            0.0
        } else {
            long_tail_slots as f64 / slots as f64
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(scores: &[f32], tail: &[bool]) -> Vec<Candidate> {
        scores
            .iter()
            .zip(tail)
            .enumerate()
            .map(|(i, (&s, &t))| Candidate {
                index: i as u32,
                score: s,
                long_tail: t,
            })
            .collect()
    }

    #[test]
    fn lambda_zero_is_ranker_order() {
        let c = cands(&[0.1, 0.9, 0.5, 0.7], &[false; 4]);
        assert_eq!(mmr(&c, 3, 0.0, |_, _| 0.0), vec![1, 3, 2]);
    }

    #[test]
    fn lambda_one_avoids_near_duplicates() {
        // Items 0 and 1 are near duplicates (same group), 2 is different.
        let c = cands(&[1.0, 0.99, 0.2], &[false; 3]);
        let group = [0, 0, 1];
        let sim = |a: usize, b: usize| if group[a] == group[b] { 1.0 } else { 0.0 };
        assert_eq!(mmr(&c, 2, 0.0, sim), vec![0, 1]);
        assert_eq!(
            mmr(&c, 2, 1.0, sim),
            vec![0, 2],
            "first is the most relevant"
        );
        assert_eq!(mmr(&c, 2, 0.5, sim), vec![0, 2]);
    }

    #[test]
    fn mmr_never_repeats_and_handles_short_lists() {
        let c = cands(&[0.3, 0.2], &[false; 2]);
        let out = mmr(&c, 5, 0.7, |_, _| 0.5);
        assert_eq!(out.len(), 2);
        assert_ne!(out[0], out[1]);
        assert!(mmr(&[], 3, 0.5, |_, _| 0.0).is_empty());
    }

    #[test]
    fn floor_swaps_lowest_head_items_for_best_tail_items() {
        let c = cands(
            &[0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
            &[false, false, false, false, true, true],
        );
        let mut chosen = vec![0, 1, 2, 3];
        assert_eq!(long_tail_floor(&c, &mut chosen, 0.5), 2);
        assert_eq!(chosen, vec![0, 1, 5, 4]);
        let mut again = chosen.clone();
        assert_eq!(long_tail_floor(&c, &mut again, 0.5), 0, "already met");
        let mut none = vec![0, 1];
        assert_eq!(long_tail_floor(&c, &mut none, 0.0), 0, "floor 0 is off");
    }

    #[test]
    fn floor_is_bounded_by_available_tail_items() {
        let c = cands(&[0.9, 0.8, 0.7, 0.1], &[false, false, false, true]);
        let mut chosen = vec![0, 1, 2];
        assert_eq!(long_tail_floor(&c, &mut chosen, 1.0), 1);
        assert_eq!(chosen.iter().filter(|&&i| c[i].long_tail).count(), 1);
    }

    #[test]
    fn gini_extremes() {
        assert_eq!(gini(&[5, 5, 5, 5]), 0.0);
        let g = gini(&[0, 0, 0, 10]);
        assert!((g - 0.75).abs() < 1e-9, "{g}");
        assert_eq!(gini(&[0, 0]), 0.0);
    }

    #[test]
    fn exposure_stats_ignore_padding() {
        let s = exposure_stats(&[99, 1, 0, 1, 0], 1, 2);
        assert_eq!(s.coverage, 0.5);
        assert_eq!(s.long_tail_share, 0.5);
        assert!((s.gini - gini(&[1, 0, 1, 0])).abs() < 1e-12);
    }

    #[test]
    fn jaccard() {
        assert_eq!(genre_jaccard(0b11, 0b01), 0.5);
        assert_eq!(genre_jaccard(0, 0), 1.0);
        assert_eq!(genre_jaccard(0b10, 0b01), 0.0);
    }
}
