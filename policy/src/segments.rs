//! Cutting a prompt where the reference tokenizer itself cuts it: at added tokens.
//!
//! Hugging Face `tokenizers` first finds added tokens in the raw text (leftmost-longest over the
//! tokens not marked `normalized`), then normalizes, pre-tokenizes and runs BPE on each stretch
//! of text between them separately. So a stretch tokenizes the same alone as inside the whole
//! prompt, and its ids can be cached by its text. This module finds the same matches and splits
//! only at "plain" added tokens (no `lstrip`/`rstrip`/`single_word`), whose ids do not depend on
//! their neighbours; any other added token stays inside its stretch for the encoder to handle.
//!
//! The claim rests on how the reference behaves, so it is checked, not trusted: the prompt
//! encoder compares segmented and whole-prompt ids at start (and property tests do the same)
//! and turns segmenting off for a tokenizer where they differ (e.g. a Metaspace pre-tokenizer
//! that prepends a space to the first stretch only).

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use tokenizers::Tokenizer;

/// One piece of a prompt: text to encode, or an added token's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Token(u32),
}

pub struct Segmenter {
    matcher: AhoCorasick,
    /// Per pattern: the id to split out, or `None` for an added token that stays inside text.
    split_ids: Vec<Option<u32>>,
}

impl Segmenter {
    /// `None` when the tokenizer has no added token to split at.
    pub fn new(tokenizer: &Tokenizer) -> Option<Self> {
        let mut patterns: Vec<String> = Vec::new();
        let mut split_ids = Vec::new();
        let mut added: Vec<_> = tokenizer.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        for (id, token) in added {
            // Normalized tokens are matched by the reference in a second pass, on normalized
            // text inside each stretch: leaving them to the encoder keeps that order.
            if token.normalized || token.content.is_empty() {
                continue;
            }
            // A single_word token's match depends on the characters around it, which a stretch
            // cut out of its prompt no longer sees: with any, segmenting is not exact.
            if token.single_word {
                return None;
            }
            let plain = !token.lstrip && !token.rstrip;
            patterns.push(token.content.clone());
            split_ids.push(plain.then_some(id));
        }
        if split_ids.iter().all(Option::is_none) {
            return None;
        }
        let matcher = AhoCorasickBuilder::new().match_kind(MatchKind::LeftmostLongest).build(&patterns).ok()?;
        Some(Self { matcher, split_ids })
    }

    /// Appends `text`'s pieces to `out`, in order. Empty stretches are left out.
    pub fn split<'a>(&self, text: &'a str, out: &mut Vec<Piece<'a>>) {
        let mut start = 0;
        for m in self.matcher.find_iter(text) {
            let Some(id) = self.split_ids[m.pattern().as_usize()] else { continue };
            if m.start() > start {
                out.push(Piece::Text(&text[start..m.start()]));
            }
            out.push(Piece::Token(id));
            start = m.end();
        }
        if start < text.len() {
            out.push(Piece::Text(&text[start..]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::BUILTIN_TOKENIZER_JSON;

    #[test]
    fn splits_at_special_tokens_only() {
        let t = Tokenizer::from_bytes(BUILTIN_TOKENIZER_JSON).unwrap();
        let s = Segmenter::new(&t).unwrap();
        let start = t.token_to_id("<|im_start|>").unwrap();
        let end = t.token_to_id("<|im_end|>").unwrap();
        let mut out = Vec::new();
        s.split("<|im_start|>user\nhi <|im_start <|im_end|><|im_end|>\n", &mut out);
        assert_eq!(
            out,
            vec![
                Piece::Token(start),
                Piece::Text("user\nhi <|im_start "),
                Piece::Token(end),
                Piece::Token(end),
                Piece::Text("\n"),
            ]
        );
    }
}
