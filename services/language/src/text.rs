//! Streaming detokenisation: generated token bytes in, text deltas out. A delta never ends
//! inside a UTF-8 character and never contains text that could still turn out to be the start
//! of a stop sequence, so nothing emitted is ever taken back. Stop sequences are matched on
//! text (a stop may span several tokens, or end mid-token) and are cut from the output.

/// What one push produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Delta {
    /// Text safe to emit now (possibly empty).
    Text(String),
    /// A stop sequence matched: the text before it, not yet emitted; generation ends.
    Stopped(String),
}

pub struct TextStream {
    /// Decoded output text so far (the prompt is not included: stops match only the output).
    text: String,
    /// Trailing bytes of an incomplete UTF-8 character.
    partial: Vec<u8>,
    /// Bytes of `text` already emitted.
    emitted: usize,
    stops: Vec<String>,
    longest_stop: usize,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        let longest_stop = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            text: String::new(),
            partial: Vec::new(),
            emitted: 0,
            stops,
            longest_stop,
        }
    }

    /// Appends one token's bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Delta {
        let before = self.text.len();
        self.partial.extend_from_slice(bytes);
        self.decode_partial(false);
        if let Some(at) = self.find_stop(before) {
            let out = self.text[self.emitted..at].to_owned();
            self.emitted = at;
            return Delta::Stopped(out);
        }
        let safe = self.text.len() - self.held_back();
        let out = self.text[self.emitted..safe].to_owned();
        self.emitted = safe;
        Delta::Text(out)
    }

    /// Generation ended without a stop: everything not yet emitted, with an incomplete
    /// trailing character shown as U+FFFD (the only valid UTF-8 for it).
    pub fn finish(&mut self) -> String {
        self.decode_partial(true);
        let out = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        out
    }

    fn decode_partial(&mut self, at_end: bool) {
        loop {
            match std::str::from_utf8(&self.partial) {
                Ok(s) => {
                    self.text.push_str(s);
                    self.partial.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: the prefix was just validated.
                    self.text
                        .push_str(std::str::from_utf8(&self.partial[..valid]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            self.text.push('\u{FFFD}');
                            self.partial.drain(..valid + bad);
                        }
                        None if at_end => {
                            self.text.push('\u{FFFD}');
                            self.partial.clear();
                            return;
                        }
                        None => {
                            self.partial.drain(..valid);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Start of the earliest stop sequence that ends in text added since `before`.
    fn find_stop(&self, before: usize) -> Option<usize> {
        if self.stops.is_empty() {
            return None;
        }
        let mut from = before.saturating_sub(self.longest_stop).max(self.emitted);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// Bytes at the end of the unemitted text that are a proper prefix of some stop sequence.
    fn held_back(&self) -> usize {
        let pending = &self.text[self.emitted..];
        let mut held = 0;
        for (i, _) in pending.char_indices() {
            let suffix = &pending[i..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            {
                held = suffix.len();
                break;
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, bool) {
        let mut t = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            match t.push(p) {
                Delta::Text(s) => out.push(s),
                Delta::Stopped(s) => {
                    out.push(s);
                    return (out, true);
                }
            }
        }
        out.push(t.finish());
        (out, false)
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let e = "é".as_bytes(); // 2 bytes
        let (out, _) = run(&[], &[b"caf", &e[..1], &e[1..], b"!"]);
        assert_eq!(out, vec!["caf", "", "é", "!", ""]);
        assert!(out.iter().all(|s| !s.contains('\u{FFFD}')));
    }

    #[test]
    fn stop_spanning_tokens_is_cut_and_never_emitted_first() {
        let (out, stopped) = run(&["\n\n"], &[b"Nice dress.", b"\n", b"\nNext"]);
        assert!(stopped);
        assert_eq!(out, vec!["Nice dress.", "", ""]);
        assert_eq!(out.concat(), "Nice dress.");
    }

    #[test]
    fn held_prefix_is_released_when_it_does_not_match() {
        let (out, stopped) = run(&["END"], &[b"the E", b"N", b"d of it"]);
        assert!(!stopped);
        assert_eq!(out, vec!["the ", "", "ENd of it", ""]);
    }

    #[test]
    fn stop_inside_one_token_keeps_the_text_before_it() {
        let (out, stopped) = run(&["fit"], &[b"great", b" fit and"]);
        assert!(stopped);
        assert_eq!(out.concat(), "great ");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        // "abc" starts before "b" does: the output ends before the earliest start.
        let (out, stopped) = run(&["b", "abc"], &[b"xxabc"]);
        assert!(stopped);
        assert_eq!(out.concat(), "xx");
    }

    #[test]
    fn incomplete_character_at_the_end_becomes_a_replacement() {
        let (out, _) = run(&[], &[b"ok", &"é".as_bytes()[..1]]);
        assert_eq!(out.concat(), "ok\u{FFFD}");
        let (out, _) = run(&[], &[b"a\xffb"]);
        assert_eq!(out.concat(), "a\u{FFFD}b");
    }
}
