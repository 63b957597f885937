//! Prompt text to token ids, fast and exact: a segment cache in front of a verified encoder.
//!
//! A rendered prompt is cut at added tokens ([`crate::segments`]); each stretch of text is looked
//! up by a 128-bit hash of its text in a bounded LRU (weighted by ids held) and only stretches not
//! seen are encoded, with the fast encoder ([`crate::fast_encode`]) when it has been verified for
//! this tokenizer and the reference (`tokenizers`) otherwise. A system prompt shared by many
//! requests, or the history of a multi-turn chat, then costs little more than hashing its text.
//!
//! Exactness is checked at construction, per tokenizer, against the reference on a built-in corpus
//! (prose, code, numbers, CJK, emoji, whitespace runs, the tokenizer's own added tokens embedded in
//! text and near-misses of them, and chat renderings of all of that): the fast encoder is used
//! only if it matches everywhere, the segment cache only if segmented ids equal whole-prompt ids,
//! and `add_special_tokens` is applied as a prefix/suffix only if that equals the reference's
//! post-processor. Each failed check is logged and reported in [`EncoderReport`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::Weighter;
use serde::{Deserialize, Serialize};

use crate::error::PolicyError;
use crate::fast_encode::FastEncoder;
use crate::request::ChatMessage;
use crate::segments::{Piece, Segmenter};
use crate::tokenize::{ModelTokenizer, TokenizerFiles};

/// Which encoder turns text into ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderChoice {
    /// The fast encoder when it passes the start-up check, else the reference.
    #[default]
    Auto,
    /// Always `tokenizers`.
    Reference,
    /// The fast encoder even if the start-up check finds differences (they are still logged).
    Fast,
}

#[derive(Debug, Clone)]
pub struct EncoderOptions {
    pub encoder: EncoderChoice,
    /// Bound on the segment cache (ids held, weighted at 4 bytes per id plus per-entry overhead);
    /// 0 turns the cache off.
    pub segment_cache_bytes: u64,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self { encoder: EncoderChoice::Auto, segment_cache_bytes: 64 << 20 }
    }
}

/// What the start-up checks decided, for `/v1/mesh/status`, logs and metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EncoderReport {
    pub fast_encoder: bool,
    pub segment_cache: bool,
    pub special_affix: bool,
    /// Why a faster path is off, one line each.
    pub notes: Vec<String>,
}

/// A prompt's ids and how they were obtained.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Ids produced by running an encoder for this call.
    pub encoded: usize,
    /// Ids taken from the segment cache.
    pub cached: usize,
}

/// Cache entries cost their ids plus the key, the `Arc` and the LRU's bookkeeping.
const ENTRY_OVERHEAD: u64 = 64;

#[derive(Clone)]
struct IdsWeight;

impl Weighter<u128, Arc<[u32]>> for IdsWeight {
    fn weight(&self, _key: &u128, ids: &Arc<[u32]>) -> u64 {
        ids.len() as u64 * 4 + ENTRY_OVERHEAD
    }
}

pub struct PromptEncoder {
    tokenizer: ModelTokenizer,
    fast: Option<FastEncoder>,
    segmenter: Option<Segmenter>,
    cache: Option<Cache<u128, Arc<[u32]>, IdsWeight>>,
    /// What the post-processor adds around a single sequence (e.g. `[BOS]`, `[]`).
    affix: Option<(Vec<u32>, Vec<u32>)>,
    report: EncoderReport,
    /// Per-process seed of the segment cache's keys, so no one can aim a crafted collision.
    hash_seed: u64,
    encoded_tokens: AtomicU64,
    cached_tokens: AtomicU64,
}

impl PromptEncoder {
    pub fn new(files: &TokenizerFiles, opts: &EncoderOptions) -> Result<Self, PolicyError> {
        let tokenizer = ModelTokenizer::from_files(files)?;
        let mut report = EncoderReport::default();
        let corpus = verification_corpus(&tokenizer);

        let fast = match opts.encoder {
            EncoderChoice::Reference => None,
            EncoderChoice::Auto | EncoderChoice::Fast => match FastEncoder::from_tokenizer_json(&files.json) {
                Ok(f) => match first_mismatch(&corpus, |s| f.encode(s), |s| tokenizer.encode(s, false)) {
                    None => Some(f),
                    Some(why) if opts.encoder == EncoderChoice::Fast => {
                        report.notes.push(format!("fast encoder forced by config despite: {why}"));
                        Some(f)
                    }
                    Some(why) => {
                        report.notes.push(format!("fast encoder differs from the reference, not used: {why}"));
                        None
                    }
                },
                Err(e) => {
                    report.notes.push(format!("fast encoder cannot load this tokenizer: {e}"));
                    None
                }
            },
        };

        let segmenter = match Segmenter::new(tokenizer.reference()) {
            None => {
                report.notes.push(
                    "no added tokens to segment at (or a single_word one, which makes segments inexact); whole \
                     prompts are encoded"
                        .into(),
                );
                None
            }
            Some(seg) if opts.segment_cache_bytes > 0 => {
                let plain = |s: &str| tokenizer.encode(s, false);
                let segmented = |s: &str| encode_pieces(&seg, s, |t| tokenizer.encode(t, false));
                match first_mismatch(&corpus, segmented, plain) {
                    None => Some(seg),
                    Some(why) => {
                        report.notes.push(format!("segmenting changes ids for this tokenizer, cache off: {why}"));
                        None
                    }
                }
            }
            Some(_) => {
                report.notes.push("segment cache turned off by config".into());
                None
            }
        };
        let cache = segmenter.as_ref().map(|_| {
            let items = (opts.segment_cache_bytes / 1024).max(16) as usize;
            Cache::with_weighter(items, opts.segment_cache_bytes, IdsWeight)
        });

        let affix = special_affix(&tokenizer).filter(|(pre, post)| {
            let ok = corpus.iter().all(|s| match (tokenizer.encode(s, false), tokenizer.encode(s, true)) {
                (Ok(plain), Ok(with)) => {
                    with.len() == pre.len() + plain.len() + post.len()
                        && with.starts_with(pre)
                        && with.ends_with(post)
                        && with[pre.len()..with.len() - post.len()] == plain[..]
                }
                _ => false,
            });
            if !ok {
                report
                    .notes
                    .push("post-processor is not a fixed prefix/suffix; completions prompts use the reference".into());
            }
            ok
        });

        report.fast_encoder = fast.is_some();
        report.segment_cache = cache.is_some();
        report.special_affix = affix.is_some();
        Ok(Self {
            tokenizer,
            fast,
            segmenter,
            cache,
            affix,
            report,
            hash_seed: rand::random(),
            encoded_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
        })
    }

    pub fn tokenizer(&self) -> &ModelTokenizer {
        &self.tokenizer
    }

    pub fn report(&self) -> &EncoderReport {
        &self.report
    }

    /// Bytes the segment cache holds now (by its weights).
    pub fn cache_bytes(&self) -> u64 {
        self.cache.as_ref().map(|c| c.weight()).unwrap_or(0)
    }

    /// Totals since start: ids produced by an encoder, and ids served from the cache.
    pub fn totals(&self) -> (u64, u64) {
        (self.encoded_tokens.load(Ordering::Relaxed), self.cached_tokens.load(Ordering::Relaxed))
    }

    /// A chat request's prompt: rendered with the model's template, then encoded as the engine
    /// does for chat (the template wrote any BOS itself).
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Encoded, PolicyError> {
        let text = self.tokenizer.render_chat(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// A chat request's ids: its template inputs rendered as vLLM renders them, then encoded
    /// without special tokens (the template wrote them).
    pub fn encode_inputs(&self, inputs: &crate::chat::ChatInputs) -> Result<Encoded, PolicyError> {
        let text = self.tokenizer.render(inputs)?;
        self.encode(&text, false)
    }

    /// `text`'s ids; `add_special_tokens` applies the post-processor (vLLM does for
    /// `/v1/completions`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoded, PolicyError> {
        let out = match (add_special_tokens, &self.affix) {
            (false, _) => self.encode_plain(text)?,
            (true, Some((pre, post))) => {
                let mut e = self.encode_plain(text)?;
                if !pre.is_empty() || !post.is_empty() {
                    let mut ids = Vec::with_capacity(pre.len() + e.ids.len() + post.len());
                    ids.extend_from_slice(pre);
                    ids.append(&mut e.ids);
                    ids.extend_from_slice(post);
                    e.ids = ids;
                }
                e
            }
            (true, None) => {
                let ids = self.tokenizer.encode(text, true)?;
                Encoded { encoded: ids.len(), cached: 0, ids }
            }
        };
        self.encoded_tokens.fetch_add(out.encoded as u64, Ordering::Relaxed);
        self.cached_tokens.fetch_add(out.cached as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn encode_plain(&self, text: &str) -> Result<Encoded, PolicyError> {
        let (Some(seg), Some(cache)) = (&self.segmenter, &self.cache) else {
            let ids = self.encode_stretch(text)?;
            return Ok(Encoded { encoded: ids.len(), cached: 0, ids });
        };
        let mut pieces = Vec::new();
        seg.split(text, &mut pieces);
        let mut out = Encoded { ids: Vec::with_capacity(text.len() / 3), encoded: 0, cached: 0 };
        for piece in pieces {
            match piece {
                Piece::Token(id) => out.ids.push(id),
                Piece::Text(stretch) => {
                    let key = xxhash_rust::xxh3::xxh3_128_with_seed(stretch.as_bytes(), self.hash_seed);
                    if let Some(ids) = cache.get(&key) {
                        out.cached += ids.len();
                        out.ids.extend_from_slice(&ids);
                    } else {
                        let ids = self.encode_stretch(stretch)?;
                        out.encoded += ids.len();
                        out.ids.extend_from_slice(&ids);
                        cache.insert(key, ids.into());
                    }
                }
            }
        }
        Ok(out)
    }

    fn encode_stretch(&self, text: &str) -> Result<Vec<u32>, PolicyError> {
        match &self.fast {
            Some(f) => f.encode(text),
            None => self.tokenizer.encode(text, false),
        }
    }
}

fn encode_pieces(
    seg: &Segmenter,
    text: &str,
    encode: impl Fn(&str) -> Result<Vec<u32>, PolicyError>,
) -> Result<Vec<u32>, PolicyError> {
    let mut pieces = Vec::new();
    seg.split(text, &mut pieces);
    let mut ids = Vec::new();
    for p in pieces {
        match p {
            Piece::Token(id) => ids.push(id),
            Piece::Text(t) => ids.extend(encode(t)?),
        }
    }
    Ok(ids)
}

/// The first corpus entry where `candidate` and `reference` disagree, described.
fn first_mismatch(
    corpus: &[String],
    candidate: impl Fn(&str) -> Result<Vec<u32>, PolicyError>,
    reference: impl Fn(&str) -> Result<Vec<u32>, PolicyError>,
) -> Option<String> {
    for text in corpus {
        let want = match reference(text) {
            Ok(ids) => ids,
            Err(e) => return Some(format!("reference failed on {:?}: {e}", preview(text))),
        };
        match candidate(text) {
            Ok(got) if got == want => {}
            Ok(got) => {
                let at = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
                return Some(format!("ids differ at {at} of {} on {:?}", want.len(), preview(text)));
            }
            Err(e) => return Some(format!("failed on {:?}: {e}", preview(text))),
        }
    }
    None
}

fn preview(text: &str) -> String {
    text.chars().take(40).collect()
}

/// What `encode(_, true)` adds around `encode(_, false)`, found with a probe.
fn special_affix(t: &ModelTokenizer) -> Option<(Vec<u32>, Vec<u32>)> {
    let probe = "kvmesh probe: hello world";
    let plain = t.encode(probe, false).ok()?;
    let with = t.encode(probe, true).ok()?;
    let at = (0..=with.len().checked_sub(plain.len())?).find(|&i| with[i..i + plain.len()] == plain[..])?;
    Some((with[..at].to_vec(), with[at + plain.len()..].to_vec()))
}

/// Texts the fast paths must agree with the reference on before they are used.
pub fn verification_corpus(t: &ModelTokenizer) -> Vec<String> {
    let mut texts: Vec<String> = [
        "The quick brown fox jumps over the lazy dog. It's 5 o'clock; don't panic!",
        "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
        "def f(a, b=2):\n\treturn {'sum': a + b, \"list\": [1, 2, 3]}  # comment\n",
        "Numbers: 0 7 42 123 1234 12345 1234567890 3.14159 -2.5e-10 1,000,000 0x1F 2026-11-25",
        "日本語のテキストと中文混合，还有한국어 and English 文字。カタカナ ひらがな",
        "Emoji: 👩‍👩‍👧 🎉🎉 ✅ ❤️ 🇫🇷 — “quotes” ‘single’ … «guillemets» ½ ≥ ∑",
        "   leading spaces\n\n\n\ttabs\t\there   \r\n\r\ntrailing   ",
        "      ",
        "\n",
        "a",
        "Ünïcödé façade naïve coöperate Ελληνικά Русский текст עברית العربية हिन्दी",
        "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html> <|fake|> <| |> <s> </s> [INST] [/INST]",
        "URLs https://example.com/a/b?c=d&e=f#g and emails someone@example.org, paths /usr/local/bin",
        "mixedCASEWords camelCase snake_case SCREAMING_CASE kebab-case dot.separated.words",
        "'s\n't 're've 'm'll 'd I'm you're they'VE it'S ''s '",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The tokenizer's own added tokens, in text and as near-misses that must stay text.
    let mut added: Vec<_> = t.reference().get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    let step = (added.len() / 24).max(1);
    // Every added token at least once, side by side and in text.
    texts.push(added.iter().map(|(_, t)| t.content.as_str()).collect::<Vec<_>>().join(" x"));
    for (_, token) in added.iter().step_by(step).chain(added.iter().take(4)) {
        let c = &token.content;
        let half: String = c.chars().take(c.chars().count().div_ceil(2)).collect();
        texts.push(format!("before {c} after {c}{c}x{half} {half}"));
        texts.push(format!("{c}\n{}", texts[0]));
    }
    if t.has_chat_template() {
        let roles = ["system", "user", "assistant", "user", "assistant", "user"];
        let msgs: Vec<ChatMessage> = texts
            .iter()
            .take(12)
            .enumerate()
            .map(|(i, text)| ChatMessage { role: roles[i % roles.len()].into(), content: text.clone() })
            .collect();
        for n in [1, 2, 6, 12] {
            for gen in [true, false] {
                if let Ok(rendered) = t.render_chat(&msgs[..n.min(msgs.len())], gen) {
                    texts.push(rendered);
                }
            }
        }
    }
    texts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn builtin(opts: &EncoderOptions) -> PromptEncoder {
        PromptEncoder::new(&TokenizerFiles::builtin(), opts).unwrap()
    }

    #[test]
    fn builtin_checks() {
        let e = builtin(&EncoderOptions::default());
        let r = e.report();
        assert!(r.segment_cache && r.special_affix, "{r:?}");
        // kitoken splits GPT-2's contractions ("'s" after a newline) differently from the
        // reference's ByteLevel regex: the corpus must catch it and keep the fast path off.
        assert!(!r.fast_encoder, "{r:?}");
        assert!(r.notes.iter().any(|n| n.contains("fast encoder differs")), "{r:?}");
    }

    #[test]
    fn warm_prompt_comes_from_cache() {
        let e = builtin(&EncoderOptions::default());
        let msg = |role: &str, c: &str| ChatMessage { role: role.into(), content: c.into() };
        let history = vec![msg("system", "You are terse."), msg("user", "Tell me about the sea, at length.")];
        let first = e.encode_chat(&history, true).unwrap();
        assert!(first.encoded > first.cached, "{first:?}");
        let mut next = history.clone();
        next.push(msg("assistant", "The sea is large."));
        next.push(msg("user", "And rivers?"));
        let second = e.encode_chat(&next, true).unwrap();
        let text = e.tokenizer().render_chat(&next, true).unwrap();
        assert_eq!(second.ids, e.tokenizer().encode(&text, false).unwrap());
        assert!(second.cached > second.encoded, "{second:?}");
        assert!(e.cache_bytes() > 0);
    }

    #[test]
    fn reference_choice_and_no_cache_still_exact() {
        let e = builtin(&EncoderOptions { encoder: EncoderChoice::Reference, segment_cache_bytes: 0 });
        assert!(!e.report().fast_encoder && !e.report().segment_cache);
        let text = "plain text <|im_start|>x";
        assert_eq!(e.encode(text, true).unwrap().ids, e.tokenizer().encode(text, true).unwrap());
    }

    /// Text that stresses the encoders: words, code, digits, CJK, emoji, whitespace runs and
    /// the builtin tokenizer's special tokens and look-alikes.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z ,.!?']{0,40}",
            "[ \t\n\r]{1,6}",
            "[0-9.,]{1,12}",
            "[\u{4e00}-\u{4e40}\u{3040}-\u{3060}]{1,8}",
            Just("👩‍👩‍👧🎉 ".to_string()),
            Just("fn x() { return y[0]; }\n".to_string()),
            Just("<|im_start|>".to_string()),
            Just("<|im_end|>".to_string()),
            Just("<|im_start".to_string()),
            Just("|>".to_string()),
            "\\PC{0,6}",
        ]
    }

    fn conversation() -> impl Strategy<Value = Vec<ChatMessage>> {
        let role = prop_oneof![Just("system"), Just("user"), Just("assistant")];
        let content = prop::collection::vec(fragment(), 0..6).prop_map(|v| v.concat());
        prop::collection::vec((role, content), 1..7)
            .prop_map(|v| v.into_iter().map(|(r, c)| ChatMessage { role: r.to_string(), content: c }).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn cached_and_fast_paths_equal_reference(convs in prop::collection::vec(conversation(), 1..4), gen in any::<bool>()) {
            let e = builtin(&EncoderOptions::default());
            let reference = e.tokenizer().clone();
            // Several conversations through one encoder, so later ones hit what earlier ones cached.
            for conv in &convs {
                let text = reference.render_chat(conv, gen).unwrap();
                let want = reference.encode(&text, false).unwrap();
                prop_assert_eq!(&e.encode_chat(conv, gen).unwrap().ids, &want);
                prop_assert_eq!(e.encode(&text, true).unwrap().ids, reference.encode(&text, true).unwrap());
                // Again, now warm.
                prop_assert_eq!(&e.encode_chat(conv, gen).unwrap().ids, &want);
            }
        }
    }
}
