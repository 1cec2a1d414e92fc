//! Turning a growing token sequence into text deltas: never split a UTF-8 character, and hold
//! back text that might be the start of a stop string until it is known not to be.

use tokenizers::Tokenizer;

use ferry_core::{Error, Result};

/// Incremental detokeniser. Byte-level BPE emits partial UTF-8 sequences for multi-byte
/// characters; decoding them gives U+FFFD, so text is only released once it decodes cleanly.
pub struct Detokenizer<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    /// Start of the window re-decoded for context (SentencePiece needs the previous tokens to
    /// know whether a word starts with a space).
    prefix_start: usize,
    /// Tokens before this index have been released as text.
    released: usize,
}

impl<'a> Detokenizer<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Detokenizer {
            tokenizer,
            tokens: Vec::new(),
            prefix_start: 0,
            released: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Engine(format!("detokenize: {e}")))
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        let prefix = self.decode(&self.tokens[self.prefix_start..self.released])?;
        let full = self.decode(&self.tokens[self.prefix_start..])?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(delta) = full.get(prefix.len()..) else {
            // The new token changed how earlier text decodes; wait for more context.
            return Ok(None);
        };
        let delta = delta.to_string();
        self.prefix_start = self.released;
        self.released = self.tokens.len();
        Ok(Some(delta))
    }

    /// Text of tokens not yet released (an incomplete character at the end of generation).
    pub fn flush(&mut self) -> Result<Option<String>> {
        if self.released == self.tokens.len() {
            return Ok(None);
        }
        let prefix = self.decode(&self.tokens[self.prefix_start..self.released])?;
        let full = self.decode(&self.tokens[self.prefix_start..])?;
        self.released = self.tokens.len();
        Ok(full
            .get(prefix.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }
}

/// Outcome of feeding text to a [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub enum StopScan {
    /// Text that can be released now (may be empty while a possible stop prefix is held).
    Continue(String),
    /// A stop string matched; release this text (everything before the match) and stop.
    Stopped(String),
}

/// Finds stop strings across delta boundaries without ever releasing part of one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Feeds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan::Continue(text.to_string());
        }
        self.held.push_str(text);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(pos) = first_match {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return StopScan::Stopped(out);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut keep_from = self.held.len();
        for (idx, _) in self.held.char_indices().rev() {
            let suffix = &self.held[idx..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                keep_from = idx;
            }
            if self.held.len() - idx >= self.max_stop_len() {
                break;
            }
        }
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopScan::Continue(out)
    }

    fn max_stop_len(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(0)
    }

    /// Releases held text at the end of generation (no stop string can complete any more).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stops: &[&str], chunks: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for c in chunks {
            match m.push(c) {
                StopScan::Continue(t) => out.push_str(&t),
                StopScan::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_across_chunks_is_never_released() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
        assert_eq!(
            run(&["END"], &["hello E", "NX"]),
            ("hello ENX".into(), false)
        );
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(
            run(&["\n\n", "Q:"], &["A1\n", "Q", ": next"]),
            ("A1\n".into(), true)
        );
    }

    proptest! {
        /// Whatever the chunking, the released text is the input cut at the first stop match.
        #[test]
        fn chunking_does_not_change_the_result(text in "[ab\u{e9}\u{1F600}]{0,24}", cuts in proptest::collection::vec(0usize..24, 0..6)) {
            let stop = "ab\u{e9}";
            let expected = match text.find(stop) { Some(p) => (text[..p].to_string(), true), None => (text.clone(), false) };
            let mut bounds: Vec<usize> = cuts.into_iter().filter_map(|c| text.char_indices().nth(c).map(|(i, _)| i)).collect();
            bounds.sort_unstable();
            bounds.dedup();
            let mut chunks = Vec::new();
            let mut last = 0;
            for b in bounds { chunks.push(&text[last..b]); last = b; }
            chunks.push(&text[last..]);
            prop_assert_eq!(run(&[stop], &chunks), expected);
        }
    }
}
