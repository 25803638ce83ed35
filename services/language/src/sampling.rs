//! Choosing the next token from a row of logits: penalties, then greedy or sampling with
//! temperature, top-k, typical-p and top-p. Pure logic over `&mut [f32]`, one [`Sampler`] per
//! sequence with its own seeded generator, so a sequence's output never depends on which
//! other sequences share its batch.

/// Validated generation parameters of one request (see the proto for each one's meaning).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// `None`: greedy. `Some(t)`: sample at temperature `t`.
    pub temperature: Option<f32>,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 1.0 = off.
    pub typical_p: f32,
    /// 1.0 = off.
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub stop: Vec<String>,
    pub seed: u64,
    pub return_logprobs: bool,
}

impl SamplingParams {
    /// Greedy decoding of `max_new_tokens` with every control off.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            min_new_tokens: 0,
            temperature: None,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            stop: Vec::new(),
            seed: 0,
            return_logprobs: false,
        }
    }
}

/// SplitMix64: tiny, fast, and fully specified, so a seed means the same stream on every
/// platform and release (a library RNG may change its algorithm between versions).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Per-sequence decoding state: parameters, generator and token counts for the penalties.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Tokens seen in the prompt or the output (repetition penalty).
    seen: Vec<bool>,
    /// Times each token appeared in the output (frequency and presence penalties).
    counts: Vec<u32>,
    generated: usize,
    eos: u32,
    /// Reused scratch: (token, probability) candidates.
    scratch: Vec<(u32, f64)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32], vocab: usize, eos: u32) -> Self {
        let mut seen = vec![false; vocab];
        for &t in prompt {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Self {
            rng: Rng::new(params.seed),
            params,
            seen,
            counts: vec![0; vocab],
            generated: 0,
            eos,
            scratch: Vec::with_capacity(vocab),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place) and records it. Returns the token
    /// and its log-probability under the penalised, temperature-scaled distribution (before
    /// truncation by top-k/top-p/typical-p).
    pub fn next(&mut self, logits: &mut [f32]) -> (u32, f32) {
        self.penalise(logits);
        let token = match self.params.temperature {
            None => argmax(logits),
            Some(t) => {
                if t != 1.0 {
                    let inv = 1.0 / t;
                    logits.iter_mut().for_each(|l| *l *= inv);
                }
                self.sample(logits)
            }
        };
        // A full pass over the vocabulary: only when the caller asked for log-probabilities.
        let logprob = if self.params.return_logprobs {
            log_softmax_at(logits, token as usize)
        } else {
            0.0
        };
        self.record(token);
        (token, logprob)
    }

    fn record(&mut self, token: u32) {
        let i = token as usize;
        if i < self.seen.len() {
            self.seen[i] = true;
            self.counts[i] += 1;
        }
        self.generated += 1;
    }

    fn penalise(&mut self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for (l, &seen) in logits.iter_mut().zip(&self.seen) {
                if seen {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (l, &c) in logits.iter_mut().zip(&self.counts) {
                if c > 0 {
                    *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
        if self.generated < p.min_new_tokens
            && let Some(l) = logits.get_mut(self.eos as usize)
        {
            *l = f32::NEG_INFINITY;
        }
    }

    /// Samples from softmax(logits) after the truncations, consuming exactly one draw.
    fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, f64::from(l))),
        );
        let by_value_desc =
            |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Top-k first, on the logits themselves (softmax preserves order): the exponentials
        // below then run over k candidates instead of the whole vocabulary.
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, by_value_desc);
            cands.truncate(p.top_k);
        }
        let max = cands.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
        let mut total = 0.0f64;
        for c in cands.iter_mut() {
            // f32 exp: a third the cost of f64 on the whole vocabulary, and the sum is f64.
            c.1 = f64::from(((c.1 - max) as f32).exp());
            total += c.1;
        }
        cands.retain(|c| c.1 > 0.0);
        cands.iter_mut().for_each(|c| c.1 /= total);
        if p.typical_p < 1.0 {
            let entropy: f64 = cands.iter().map(|c| -c.1 * c.1.ln()).sum();
            cands.sort_by(|a, b| {
                let da = (-a.1.ln() - entropy).abs();
                let db = (-b.1.ln() - entropy).abs();
                da.total_cmp(&db).then(a.0.cmp(&b.0))
            });
            keep_mass(cands, f64::from(p.typical_p));
            renormalise(cands);
        }
        if p.top_p < 1.0 {
            cands.sort_by(by_value_desc);
            keep_mass(cands, f64::from(p.top_p));
            renormalise(cands);
        }
        let u = self.rng.next_f64();
        let mut acc = 0.0;
        for &(t, prob) in cands.iter() {
            acc += prob;
            if u < acc {
                return t;
            }
        }
        // Rounding left u above the last cumulative sum: the last candidate.
        cands.last().map_or(self.eos, |c| c.0)
    }
}

/// Keeps the shortest prefix whose mass reaches `mass` (at least one candidate).
fn keep_mass(cands: &mut Vec<(u32, f64)>, mass: f64) {
    let mut acc = 0.0;
    let mut keep = cands.len();
    for (i, c) in cands.iter().enumerate() {
        acc += c.1;
        if acc >= mass {
            keep = i + 1;
            break;
        }
    }
    cands.truncate(keep.max(1));
}

fn renormalise(cands: &mut [(u32, f64)]) {
    let total: f64 = cands.iter().map(|c| c.1).sum();
    if total > 0.0 {
        cands.iter_mut().for_each(|c| c.1 /= total);
    }
}

/// Index of the largest logit; the lowest index wins ties, so greedy output is well defined.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (f64::from(logits[i] - max) - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: Some(1.0),
            seed,
            ..SamplingParams::greedy(10)
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit_and_its_logprob() {
        let params = SamplingParams {
            return_logprobs: true,
            ..SamplingParams::greedy(4)
        };
        let mut s = Sampler::new(params, &[], 4, 3);
        let mut logits = vec![0.0, 2.0, 1.0, 2.0];
        let (t, lp) = s.next(&mut logits);
        assert_eq!(t, 1, "lowest index wins the tie");
        let expected = 2.0 - (1.0f64 + 2.0f64.exp() * 2.0 + 1.0f64.exp()).ln();
        assert!((f64::from(lp) - expected).abs() < 1e-5);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..64).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(sampling(seed), &[], 64, 63);
            (0..32)
                .map(|_| s.next(&mut logits.clone()).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 1,
                ..sampling(3)
            },
            &[],
            5,
            4,
        );
        for _ in 0..20 {
            assert_eq!(s.next(&mut [0.1, 0.5, 3.0, 0.2, 0.0]).0, 2);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // Probabilities ~ [0.6, 0.3, 0.1 spread]: top_p 0.5 keeps only token 0.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.05f32.ln(), 0.05f32.ln()];
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                ..sampling(11)
            },
            &[],
            4,
            3,
        );
        for _ in 0..50 {
            assert_eq!(s.next(&mut logits.to_vec()).0, 0);
        }
    }

    #[test]
    fn typical_p_keeps_tokens_near_the_entropy() {
        // p = [0.4, 0.15 x 4]: entropy 1.505 nats; the likeliest token's surprise (0.92) is
        // further from it than the others' (1.90), so typical sampling at mass 0.5 keeps the
        // four 0.15 tokens and never the most likely one.
        let logits = [
            0.4f32.ln(),
            0.15f32.ln(),
            0.15f32.ln(),
            0.15f32.ln(),
            0.15f32.ln(),
        ];
        let mut s = Sampler::new(
            SamplingParams {
                typical_p: 0.5,
                ..sampling(5)
            },
            &[],
            5,
            4,
        );
        for _ in 0..100 {
            assert_ne!(s.next(&mut logits.to_vec()).0, 0);
        }
    }

    #[test]
    fn penalties_and_min_tokens() {
        // Repetition penalty divides a positive logit of a prompt token.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 4.0,
                ..SamplingParams::greedy(4)
            },
            &[0],
            3,
            2,
        );
        assert_eq!(s.next(&mut [2.0, 1.0, 0.0]).0, 1);
        // Presence penalty pushes away a token once generated.
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 2.0,
                ..SamplingParams::greedy(4)
            },
            &[],
            3,
            2,
        );
        assert_eq!(s.next(&mut [2.0, 1.0, 0.0]).0, 0);
        assert_eq!(s.next(&mut [2.0, 1.0, 0.0]).0, 1);
        // EOS is masked until min_new_tokens are out.
        let mut s = Sampler::new(
            SamplingParams {
                min_new_tokens: 2,
                ..SamplingParams::greedy(4)
            },
            &[],
            3,
            2,
        );
        assert_eq!(s.next(&mut [0.0, 1.0, 9.0]).0, 1);
        assert_eq!(s.next(&mut [0.0, 1.0, 9.0]).0, 1);
        assert_eq!(s.next(&mut [0.0, 1.0, 9.0]).0, 2);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.75f32.ln(), 0.25f32.ln()];
        let mut s = Sampler::new(sampling(42), &[], 2, 1);
        let n = 4000;
        let zeros = (0..n)
            .filter(|_| s.next(&mut logits.to_vec()).0 == 0)
            .count();
        let share = zeros as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.03, "share of token 0: {share}");
    }
}
