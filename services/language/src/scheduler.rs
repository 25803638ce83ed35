//! The engine's scheduling policy, apart from the model: which waiting requests join the
//! running batch, which OIP requests run this iteration, and how slots stay contiguous when a
//! sequence leaves. Pure bookkeeping over sizes, so every rule is unit-tested without libtorch;
//! the worker in [`crate::engine`] applies the verdicts.

/// The limits admission works within (from `language.*`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Cache slots: sequences decoded together.
    pub max_batch: usize,
    /// Prompt + `max_new_tokens` of every running sequence, summed.
    pub max_total_tokens: usize,
    /// Prompt tokens one prefill may take (the first request of a prefill always may: each
    /// prompt alone fits, checked when the model loads).
    pub max_prefill_tokens: usize,
}

/// What admission needs to know about one waiting generation request.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Slots it occupies: one per returned sequence (they share one prefill).
    pub sequences: usize,
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    /// Its caller went away.
    pub gone: bool,
    /// Its deadline passed.
    pub expired: bool,
}

impl Candidate {
    /// Token budget it holds while it runs: every sequence holds the prompt's positions and
    /// its own new tokens.
    pub fn budget(&self) -> usize {
        self.sequences * (self.prompt_tokens + self.max_new_tokens)
    }
}

/// The fate of a waiting request this iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Prefill it now.
    Admit,
    /// Keep it queued, in place.
    Wait,
    /// Drop it: the caller left.
    Cancelled,
    /// Answer `DEADLINE_EXCEEDED` and drop it.
    Expired,
}

/// One iteration's admission pass over the queue, in arrival order.
///
/// Arrival order is strict: the first request that does not fit blocks those behind it, so a
/// long prompt or a many-sequence request is never starved by a stream of small ones. Requests
/// whose caller left or whose deadline passed are removed wherever they wait, blocked or not.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    free_slots: usize,
    tokens: usize,
    prefill_tokens: usize,
    admitted: usize,
    blocked: bool,
}

impl Admission {
    /// `running_slots` and `used_tokens` are what the running batch holds; `open` is false on
    /// iterations that admit nothing (between `decode_steps_per_prefill` steps).
    pub fn new(limits: Limits, running_slots: usize, used_tokens: usize, open: bool) -> Self {
        Self {
            limits,
            free_slots: limits.max_batch.saturating_sub(running_slots),
            tokens: used_tokens,
            prefill_tokens: 0,
            admitted: 0,
            blocked: !open,
        }
    }

    pub fn consider(&mut self, c: &Candidate) -> Verdict {
        if c.gone {
            return Verdict::Cancelled;
        }
        if c.expired {
            return Verdict::Expired;
        }
        if self.blocked {
            return Verdict::Wait;
        }
        let fits = c.sequences <= self.free_slots
            && self.tokens + c.budget() <= self.limits.max_total_tokens
            && (self.admitted == 0
                || self.prefill_tokens + c.prompt_tokens <= self.limits.max_prefill_tokens);
        if !fits {
            self.blocked = true;
            return Verdict::Wait;
        }
        self.free_slots -= c.sequences;
        self.tokens += c.budget();
        self.prefill_tokens += c.prompt_tokens;
        self.admitted += 1;
        Verdict::Admit
    }
}

/// Whether a request could ever be admitted into an empty batch (checked before it queues,
/// so nothing waits forever).
pub fn could_ever_fit(limits: Limits, c: &Candidate) -> Result<(), String> {
    if c.sequences > limits.max_batch {
        return Err(format!(
            "{} sequences need {} cache slots; the batch has {} (`language.max_batch_size`)",
            c.sequences, c.sequences, limits.max_batch
        ));
    }
    if c.budget() > limits.max_total_tokens {
        return Err(format!(
            "{} sequences of {} prompt + {} new tokens need {} tokens of budget; at most {} (`language.max_total_tokens`)",
            c.sequences,
            c.prompt_tokens,
            c.max_new_tokens,
            c.budget(),
            limits.max_total_tokens
        ));
    }
    Ok(())
}

/// OIP requests taken this iteration, in arrival order within `max_tokens` token positions;
/// the first that does not fit waits for the next iteration, and so do those behind it.
#[derive(Debug)]
pub struct ForwardBudget {
    max_tokens: usize,
    taken: usize,
    blocked: bool,
}

impl ForwardBudget {
    pub fn new(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            taken: 0,
            blocked: false,
        }
    }

    /// True if a request of `tokens` positions runs now.
    pub fn take(&mut self, tokens: usize) -> bool {
        if self.blocked || self.taken + tokens > self.max_tokens {
            self.blocked = true;
            return false;
        }
        self.taken += tokens;
        true
    }
}

/// Running sequences occupy slots `0..n` contiguously, so a decode step passes one `narrow`
/// view of the cache. Freeing slot `i` moves the last sequence into it: the slot to copy from,
/// if any.
pub fn vacate(i: usize, running: usize) -> Option<usize> {
    debug_assert!(i < running);
    let last = running - 1;
    (i != last).then_some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_batch: 4,
        max_total_tokens: 100,
        max_prefill_tokens: 30,
    };

    fn req(sequences: usize, prompt: usize, new: usize) -> Candidate {
        Candidate {
            sequences,
            prompt_tokens: prompt,
            max_new_tokens: new,
            gone: false,
            expired: false,
        }
    }

    fn run(adm: &mut Admission, queue: &[Candidate]) -> Vec<Verdict> {
        queue.iter().map(|c| adm.consider(c)).collect()
    }

    use Verdict::*;

    #[test]
    fn admits_in_arrival_order_until_one_does_not_fit_then_blocks_the_rest() {
        let mut adm = Admission::new(LIMITS, 0, 0, true);
        // 3rd needs 3 slots with 2 free: it blocks the 4th even though the 4th would fit.
        let v = run(
            &mut adm,
            &[req(1, 5, 5), req(1, 5, 5), req(3, 5, 5), req(1, 5, 5)],
        );
        assert_eq!(v, vec![Admit, Admit, Wait, Wait]);
    }

    #[test]
    fn the_token_budget_counts_every_returned_sequence() {
        // 3 sequences x (10 + 20) = 90 of 100 fit alone; with 20 already used they do not.
        assert_eq!(
            Admission::new(LIMITS, 0, 0, true).consider(&req(3, 10, 20)),
            Admit
        );
        assert_eq!(
            Admission::new(LIMITS, 1, 20, true).consider(&req(3, 10, 20)),
            Wait
        );
    }

    #[test]
    fn the_prefill_cap_limits_later_prompts_never_the_first() {
        let mut adm = Admission::new(LIMITS, 0, 0, true);
        // A 40-token prompt exceeds the 30-token cap alone, but is admitted first.
        assert_eq!(
            run(&mut adm, &[req(1, 40, 1), req(1, 1, 1)]),
            vec![Admit, Wait]
        );
        let mut adm = Admission::new(LIMITS, 0, 0, true);
        assert_eq!(
            run(&mut adm, &[req(1, 20, 1), req(1, 10, 1), req(1, 1, 1)]),
            vec![Admit, Admit, Wait]
        );
    }

    #[test]
    fn cancelled_and_expired_requests_leave_even_behind_a_blocked_one_or_while_closed() {
        let gone = Candidate {
            gone: true,
            ..req(1, 1, 1)
        };
        let late = Candidate {
            expired: true,
            ..req(1, 1, 1)
        };
        let mut adm = Admission::new(LIMITS, 4, 0, true);
        assert_eq!(
            run(&mut adm, &[req(1, 1, 1), gone, late]),
            vec![Wait, Cancelled, Expired]
        );
        let mut closed = Admission::new(LIMITS, 0, 0, false);
        assert_eq!(
            run(&mut closed, &[req(1, 1, 1), gone]),
            vec![Wait, Cancelled]
        );
    }

    #[test]
    fn a_request_larger_than_an_empty_batch_is_refused_before_it_queues() {
        assert!(could_ever_fit(LIMITS, &req(4, 10, 10)).is_ok());
        let slots = could_ever_fit(LIMITS, &req(5, 1, 1)).unwrap_err();
        assert!(slots.contains("max_batch_size"), "{slots}");
        let budget = could_ever_fit(LIMITS, &req(2, 30, 30)).unwrap_err();
        assert!(
            budget.contains("120 tokens") && budget.contains("max_total_tokens"),
            "{budget}"
        );
    }

    #[test]
    fn forward_budget_is_arrival_ordered() {
        let mut b = ForwardBudget::new(10);
        assert_eq!(
            [4, 8, 2].map(|t| b.take(t)),
            [true, false, false],
            "the 2 behind the 8 waits too"
        );
    }

    #[test]
    fn vacating_moves_the_last_sequence_into_the_hole() {
        assert_eq!(vacate(1, 4), Some(3));
        assert_eq!(vacate(3, 4), None);
        assert_eq!(vacate(0, 1), None);
    }
}
