//! Guardrails: rules run on a prompt before it is routed and on the answer as it flows back.
//!
//! A rule ([`Guardrail`]) reports findings on a text: a deny, or a span to replace. From the
//! findings come a [`Verdict`]: deny if any finding denies, else rewrite if anything was
//! replaced, else allow. Rules run in the configured order and each sees the text as the rules
//! before it left it.
//!
//! Built in: `deny` (regular expressions and word lists), `pii` (emails, phone numbers, payment
//! card numbers that pass the Luhn check, US social security numbers; redacted or denied),
//! `models` (a model allow-list) and `max_length` (prompt characters). The `webhook` kind is
//! configured here but runs in `node`, which owns the HTTP client.
//!
//! Streamed answers go through a [`StreamScanner`]: it keeps the last `window` characters of
//! the text unreleased, so a match that spans chunk boundaries is still caught, and a redaction
//! is applied before any of its characters reach the client. What the bound costs: text reaches
//! the client `window` characters late, and a match longer than `window` (256 by default) can
//! be missed when it straddles text that was already released.
//!
//! Why one long file: the rules share one trait, one config enum and the stream scanner; each
//! rule is small, and the last ~140 lines are tests.

use std::sync::{Arc, LazyLock};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::PolicyError;

/// Where a rule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Prompt,
    Response,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Prompt => "prompt",
            Stage::Response => "response",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny { rule: String, reason: String },
    Rewrite { text: String },
}

impl Verdict {
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny { .. } => "deny",
            Verdict::Rewrite { .. } => "rewrite",
        }
    }
}

/// What a rule found in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Deny {
        reason: String,
    },
    /// Replace bytes `start..end` (char boundaries) with `with`.
    Replace {
        start: usize,
        end: usize,
        with: String,
    },
}

/// Facts a rule may need besides the text.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub stage: Stage,
    pub model: &'a str,
    pub tenant: &'a str,
    /// Characters in the whole prompt (all messages), for length rules.
    pub prompt_chars: usize,
}

pub trait Guardrail: Send + Sync {
    fn name(&self) -> &str;
    fn applies(&self, stage: Stage) -> bool;
    fn scan(&self, ctx: &Context<'_>, text: &str) -> Vec<Finding>;
    /// Whether the rule reads the text itself (a prompt given as token ids, or an answer's
    /// log-probabilities, escape it), rather than facts about the request.
    fn reads_text(&self) -> bool {
        true
    }
}

/// `[[guardrails]]` entries, in the order they run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuardrailConfig {
    /// Denies text matching any pattern (regex syntax of the `regex` crate) or containing any
    /// word (whole words, case-insensitive).
    Deny {
        name: String,
        #[serde(default = "both_stages")]
        on: Vec<Stage>,
        #[serde(default)]
        patterns: Vec<String>,
        #[serde(default)]
        words: Vec<String>,
    },
    /// Finds personal data and redacts it (`[REDACTED:email]`) or denies the text.
    Pii {
        name: String,
        #[serde(default = "both_stages")]
        on: Vec<Stage>,
        #[serde(default = "all_pii")]
        types: Vec<PiiKind>,
        #[serde(default)]
        action: PiiAction,
    },
    /// Only these models may be asked for, whatever the key allows.
    Models { name: String, allow: Vec<String> },
    /// Denies prompts longer than `max_chars` characters in all.
    MaxLength { name: String, max_chars: usize },
    /// POSTs the text as JSON to `url` and applies the verdict it answers (run by `node`).
    Webhook {
        name: String,
        url: String,
        #[serde(default = "both_stages")]
        on: Vec<Stage>,
        #[serde(default = "default_webhook_timeout")]
        timeout_ms: u64,
        /// What a timeout, a failure or a garbled answer means.
        #[serde(default)]
        fail: FailMode,
    },
}

fn both_stages() -> Vec<Stage> {
    vec![Stage::Prompt, Stage::Response]
}

fn all_pii() -> Vec<PiiKind> {
    vec![PiiKind::Card, PiiKind::Ssn, PiiKind::Email, PiiKind::Phone]
}

fn default_webhook_timeout() -> u64 {
    1_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// The hook's failure lets the text through (counted and audited as `error_open`).
    Open,
    /// The hook's failure denies the text.
    #[default]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    Email,
    Phone,
    Card,
    Ssn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiAction {
    #[default]
    Redact,
    Deny,
}

impl GuardrailConfig {
    pub fn name(&self) -> &str {
        match self {
            GuardrailConfig::Deny { name, .. }
            | GuardrailConfig::Pii { name, .. }
            | GuardrailConfig::Models { name, .. }
            | GuardrailConfig::MaxLength { name, .. }
            | GuardrailConfig::Webhook { name, .. } => name,
        }
    }

    /// The built-in rule, or `None` for a webhook (which `node` runs).
    pub fn build(&self) -> Result<Option<Arc<dyn Guardrail>>, PolicyError> {
        let bad = |m: String| PolicyError::Guardrail(format!("[[guardrails]] `{}`: {m}", self.name()));
        if self.name().trim().is_empty() {
            return Err(PolicyError::Guardrail("[[guardrails]]: every entry needs a name".into()));
        }
        Ok(Some(match self {
            GuardrailConfig::Deny { name, on, patterns, words } => {
                if patterns.is_empty() && words.is_empty() {
                    return Err(bad("give `patterns` or `words`".into()));
                }
                let mut res = Vec::new();
                for p in patterns {
                    res.push(Regex::new(p).map_err(|e| bad(format!("pattern `{p}` is not a valid regex: {e}")))?);
                }
                if !words.is_empty() {
                    let alt: Vec<String> = words.iter().map(|w| regex::escape(w.trim())).collect();
                    res.push(Regex::new(&format!(r"(?i)\b(?:{})\b", alt.join("|"))).map_err(|e| bad(e.to_string()))?);
                }
                Arc::new(DenyRule { name: name.clone(), on: on.clone(), res })
            }
            GuardrailConfig::Pii { name, on, types, action } => {
                if types.is_empty() {
                    return Err(bad("`types` must list at least one of email, phone, card, ssn".into()));
                }
                Arc::new(PiiRule { name: name.clone(), on: on.clone(), types: types.clone(), action: *action })
            }
            GuardrailConfig::Models { name, allow } => {
                if allow.is_empty() {
                    return Err(bad("`allow` must list at least one model".into()));
                }
                Arc::new(ModelsRule { name: name.clone(), allow: allow.clone() })
            }
            GuardrailConfig::MaxLength { name, max_chars } => {
                Arc::new(MaxLengthRule { name: name.clone(), max_chars: *max_chars })
            }
            GuardrailConfig::Webhook { url, timeout_ms, .. } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(bad(format!("url `{url}` must start with http:// or https://")));
                }
                if *timeout_ms == 0 {
                    return Err(bad("timeout_ms must be greater than 0".into()));
                }
                return Ok(None);
            }
        }))
    }
}

struct DenyRule {
    name: String,
    on: Vec<Stage>,
    res: Vec<Regex>,
}

impl Guardrail for DenyRule {
    fn name(&self) -> &str {
        &self.name
    }
    fn applies(&self, stage: Stage) -> bool {
        self.on.contains(&stage)
    }
    fn scan(&self, _ctx: &Context<'_>, text: &str) -> Vec<Finding> {
        self.res
            .iter()
            .enumerate()
            .find(|(_, re)| re.is_match(text))
            .map(|(i, _)| vec![Finding::Deny { reason: format!("matched pattern {i} of `{}`", self.name) }])
            .unwrap_or_default()
    }
}

struct ModelsRule {
    name: String,
    allow: Vec<String>,
}

impl Guardrail for ModelsRule {
    fn reads_text(&self) -> bool {
        false
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn applies(&self, stage: Stage) -> bool {
        stage == Stage::Prompt
    }
    fn scan(&self, ctx: &Context<'_>, _text: &str) -> Vec<Finding> {
        if self.allow.iter().any(|m| m == ctx.model) {
            Vec::new()
        } else {
            vec![Finding::Deny { reason: format!("model `{}` is not allowed", ctx.model) }]
        }
    }
}

struct MaxLengthRule {
    name: String,
    max_chars: usize,
}

impl Guardrail for MaxLengthRule {
    fn reads_text(&self) -> bool {
        false
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn applies(&self, stage: Stage) -> bool {
        stage == Stage::Prompt
    }
    fn scan(&self, ctx: &Context<'_>, _text: &str) -> Vec<Finding> {
        if ctx.prompt_chars > self.max_chars {
            vec![Finding::Deny {
                reason: format!("prompt has {} characters, over {}", ctx.prompt_chars, self.max_chars),
            }]
        } else {
            Vec::new()
        }
    }
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b").expect("static regex")
});
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)[ .-]?|\b\d{3}[ .-]?)\d{3}[ .-]\d{4}\b").expect("static regex")
});
static CARD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").expect("static regex"));
static SSN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b\d{3}-\d{2}-\d{4}\b").expect("static regex"));

/// The Luhn checksum payment card numbers carry.
pub fn luhn_valid(digits: &str) -> bool {
    let ds: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if ds.len() < 13 {
        return false;
    }
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    let remainder = sum % 10;
    remainder == 0
}

impl PiiKind {
    fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::Card => "card",
            PiiKind::Ssn => "ssn",
        }
    }

    fn find(self, text: &str) -> Vec<(usize, usize)> {
        let re: &Regex = match self {
            PiiKind::Email => &EMAIL,
            PiiKind::Phone => &PHONE,
            PiiKind::Card => &CARD,
            PiiKind::Ssn => &SSN,
        };
        re.find_iter(text)
            .filter(|m| self != PiiKind::Card || luhn_valid(m.as_str()))
            .map(|m| (m.start(), m.end()))
            .collect()
    }
}

struct PiiRule {
    name: String,
    on: Vec<Stage>,
    types: Vec<PiiKind>,
    action: PiiAction,
}

impl Guardrail for PiiRule {
    fn name(&self) -> &str {
        &self.name
    }
    fn applies(&self, stage: Stage) -> bool {
        self.on.contains(&stage)
    }
    fn scan(&self, _ctx: &Context<'_>, text: &str) -> Vec<Finding> {
        // Cards first: a card number also looks like a phone number in part.
        let mut order = self.types.clone();
        order.sort_by_key(|k| match k {
            PiiKind::Card => 0,
            PiiKind::Ssn => 1,
            PiiKind::Email => 2,
            PiiKind::Phone => 3,
        });
        let mut spans: Vec<(usize, usize, PiiKind)> = Vec::new();
        for kind in order {
            for (s, e) in kind.find(text) {
                if !spans.iter().any(|&(a, b, _)| s < b && a < e) {
                    spans.push((s, e, kind));
                }
            }
        }
        if spans.is_empty() {
            return Vec::new();
        }
        if self.action == PiiAction::Deny {
            let kinds: Vec<&str> = spans.iter().map(|s| s.2.as_str()).collect();
            return vec![Finding::Deny { reason: format!("personal data: {}", kinds.join(", ")) }];
        }
        spans.sort_by_key(|s| s.0);
        spans
            .into_iter()
            .map(|(start, end, k)| Finding::Replace { start, end, with: format!("[REDACTED:{}]", k.as_str()) })
            .collect()
    }
}

/// Applies non-overlapping replacements (sorted by start) to `text`.
fn apply_replacements(text: &str, spans: &[(usize, usize, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (s, e, with) in spans {
        out.push_str(&text[at..*s]);
        out.push_str(with);
        at = *e;
    }
    out.push_str(&text[at..]);
    out
}

/// The rule's verdict on a whole text.
pub fn check(rule: &dyn Guardrail, ctx: &Context<'_>, text: &str) -> Verdict {
    let mut spans = Vec::new();
    for f in rule.scan(ctx, text) {
        match f {
            Finding::Deny { reason } => return Verdict::Deny { rule: rule.name().to_owned(), reason },
            Finding::Replace { start, end, with } => spans.push((start, end, with)),
        }
    }
    if spans.is_empty() {
        return Verdict::Allow;
    }
    spans.sort_by_key(|s| s.0);
    spans.dedup_by(|b, a| b.0 < a.1);
    Verdict::Rewrite { text: apply_replacements(text, &spans) }
}

/// The largest byte index `<= i` on a char boundary of `s`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Runs response rules on a streamed text as it arrives.
pub struct StreamScanner {
    rules: Vec<Arc<dyn Guardrail>>,
    /// Text received but not released yet: at most `window` bytes after each push.
    pending: String,
    window: usize,
    /// Per rule: whether it rewrote anything.
    rewrote: Vec<bool>,
}

/// A stream stopped by a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub rule: String,
    pub reason: String,
}

impl StreamScanner {
    /// `rules` that do not apply to responses are left out; `window` is in bytes of text.
    pub fn new(rules: &[Arc<dyn Guardrail>], window: usize) -> Self {
        let rules: Vec<_> = rules.iter().filter(|r| r.applies(Stage::Response)).cloned().collect();
        let rewrote = vec![false; rules.len()];
        Self { rules, pending: String::new(), window, rewrote }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Adds text; returns what may be released now (possibly empty), or the rule that denies.
    pub fn push(&mut self, ctx: &Context<'_>, text: &str) -> Result<String, Denied> {
        self.pending.push_str(text);
        self.release(ctx, false)
    }

    /// The stream ended: checks and releases everything held back.
    pub fn finish(&mut self, ctx: &Context<'_>) -> Result<String, Denied> {
        self.release(ctx, true)
    }

    /// Per rule (by name): `rewrite` if it redacted anything, else `allow`. A denying rule is
    /// reported by `push`/`finish` instead.
    pub fn verdicts(&self) -> Vec<(String, &'static str)> {
        self.rules
            .iter()
            .zip(&self.rewrote)
            .map(|(r, &w)| (r.name().to_owned(), if w { "rewrite" } else { "allow" }))
            .collect()
    }

    fn release(&mut self, ctx: &Context<'_>, last: bool) -> Result<String, Denied> {
        // Spans by rule order, then position; an earlier rule's span wins an overlap.
        let mut spans: Vec<(usize, usize, String, usize)> = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            for f in rule.scan(ctx, &self.pending) {
                match f {
                    Finding::Deny { reason } => return Err(Denied { rule: rule.name().to_owned(), reason }),
                    Finding::Replace { start, end, with } => {
                        if !spans.iter().any(|s| start < s.1 && s.0 < end) {
                            spans.push((start, end, with, i));
                        }
                    }
                }
            }
        }
        spans.sort_by_key(|s| s.0);
        // With no rule to match, nothing is held back: a node with API keys but no answer
        // rules must not delay every stream's first text by the window.
        let mut cut = if last || self.rules.is_empty() {
            self.pending.len()
        } else {
            floor_boundary(&self.pending, self.pending.len().saturating_sub(self.window))
        };
        // Never release part of a match: hold it back whole.
        if let Some(s) = spans.iter().find(|s| s.0 < cut && s.1 > cut) {
            cut = s.0;
        }
        let mut applied: Vec<(usize, usize, String)> = Vec::new();
        for (start, end, with, rule) in spans.into_iter().filter(|s| s.1 <= cut) {
            self.rewrote[rule] = true;
            applied.push((start, end, with));
        }
        let out = apply_replacements(&self.pending[..cut], &applied);
        self.pending.drain(..cut);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(stage: Stage) -> Context<'static> {
        Context { stage, model: "m", tenant: "t", prompt_chars: 0 }
    }

    fn rule(toml_like: GuardrailConfig) -> Arc<dyn Guardrail> {
        toml_like.build().unwrap().unwrap()
    }

    fn pii() -> Arc<dyn Guardrail> {
        rule(GuardrailConfig::Pii {
            name: "pii".into(),
            on: both_stages(),
            types: all_pii(),
            action: PiiAction::Redact,
        })
    }

    #[test]
    fn deny_patterns_and_words() {
        let r = rule(GuardrailConfig::Deny {
            name: "secrets".into(),
            on: both_stages(),
            patterns: vec![r"sk-[a-z0-9]{8}".into()],
            words: vec!["Forbidden".into()],
        });
        assert_eq!(check(&*r, &ctx(Stage::Prompt), "hello"), Verdict::Allow);
        assert!(matches!(check(&*r, &ctx(Stage::Prompt), "my key sk-abcd1234"), Verdict::Deny { .. }));
        assert!(matches!(check(&*r, &ctx(Stage::Prompt), "this is FORBIDDEN."), Verdict::Deny { .. }));
        // Whole words only.
        assert_eq!(check(&*r, &ctx(Stage::Prompt), "unforbiddenness"), Verdict::Allow);
    }

    #[test]
    fn pii_redaction_with_luhn() {
        let r = pii();
        let text = "mail bob@example.com or call (555) 123-4567; card 4111 1111 1111 1111, not 4111 1111 1111 1112; ssn 123-45-6789";
        let Verdict::Rewrite { text } = check(&*r, &ctx(Stage::Prompt), text) else { panic!() };
        assert_eq!(
            text,
            "mail [REDACTED:email] or call [REDACTED:phone]; card [REDACTED:card], not 4111 1111 1111 1112; ssn [REDACTED:ssn]"
        );
        assert!(luhn_valid("4539 1488 0343 6467"));
        assert!(!luhn_valid("1234"));
        let deny = rule(GuardrailConfig::Pii {
            name: "no-pii".into(),
            on: both_stages(),
            types: vec![PiiKind::Email],
            action: PiiAction::Deny,
        });
        assert!(matches!(check(&*deny, &ctx(Stage::Prompt), "a@b.io"), Verdict::Deny { .. }));
        assert_eq!(check(&*deny, &ctx(Stage::Prompt), "555-123-4567"), Verdict::Allow);
    }

    #[test]
    fn models_and_length_rules_apply_to_prompts() {
        let m = rule(GuardrailConfig::Models { name: "models".into(), allow: vec!["m".into()] });
        assert_eq!(check(&*m, &ctx(Stage::Prompt), ""), Verdict::Allow);
        let other = Context { model: "x", ..ctx(Stage::Prompt) };
        assert!(matches!(check(&*m, &other, ""), Verdict::Deny { .. }));
        assert!(!m.applies(Stage::Response));
        let l = rule(GuardrailConfig::MaxLength { name: "len".into(), max_chars: 10 });
        assert!(matches!(check(&*l, &Context { prompt_chars: 11, ..ctx(Stage::Prompt) }, "x"), Verdict::Deny { .. }));
    }

    #[test]
    fn config_errors_name_the_rule() {
        let e =
            GuardrailConfig::Deny { name: "d".into(), on: both_stages(), patterns: vec!["(".into()], words: vec![] }
                .build()
                .err()
                .unwrap()
                .to_string();
        assert!(e.contains("`d`") && e.contains("regex"), "{e}");
        let w = GuardrailConfig::Webhook {
            name: "w".into(),
            url: "ftp://x".into(),
            on: both_stages(),
            timeout_ms: 1,
            fail: FailMode::Open,
        };
        assert!(w.build().err().unwrap().to_string().contains("http://"));
    }

    #[test]
    fn stream_redacts_an_email_split_across_chunks() {
        let mut s = StreamScanner::new(&[pii()], 64);
        let c = ctx(Stage::Response);
        let mut out = String::new();
        for chunk in ["Write to jo", "hn.doe@exa", "mple.com today. ", &"filler ".repeat(20), "end"] {
            out += &s.push(&c, chunk).unwrap();
            assert!(!out.contains("john") && !out.contains("example"), "{out}");
        }
        out += &s.finish(&c).unwrap();
        assert!(out.starts_with("Write to [REDACTED:email] today. filler"), "{out}");
        assert!(out.ends_with("filler end"));
        assert_eq!(s.verdicts(), vec![("pii".to_owned(), "rewrite")]);
    }

    #[test]
    fn a_stream_with_no_rules_is_released_as_it_comes() {
        let mut s = StreamScanner::new(&[], 256);
        let ctx = Context { stage: Stage::Response, model: "m", tenant: "t", prompt_chars: 0 };
        assert_eq!(s.push(&ctx, "Hello").unwrap(), "Hello");
        assert_eq!(s.push(&ctx, ", world").unwrap(), ", world");
        assert_eq!(s.finish(&ctx).unwrap(), "");
    }

    #[test]
    fn stream_holds_back_a_match_straddling_the_window() {
        // The window's cut falls inside a card number: the cut moves back to the match's start,
        // so no digit leaks before the redaction applies.
        let mut s = StreamScanner::new(&[pii()], 24);
        let c = ctx(Stage::Response);
        assert_eq!(s.push(&c, "pay 4111 1111 1111 1111").unwrap(), "");
        assert_eq!(s.push(&c, " thanks").unwrap(), "pay ");
        let mut out = "pay ".to_owned();
        out += &s.push(&c, ", bye now").unwrap();
        out += &s.finish(&c).unwrap();
        assert_eq!(out, "pay [REDACTED:card] thanks, bye now");
    }

    #[test]
    fn stream_denies_a_word_across_chunks_before_releasing_it() {
        let deny = rule(GuardrailConfig::Deny {
            name: "w".into(),
            on: both_stages(),
            patterns: vec![],
            words: vec!["kaboom".into()],
        });
        let mut s = StreamScanner::new(&[deny], 32);
        let c = ctx(Stage::Response);
        let released = s.push(&c, "all fine ka").unwrap();
        assert!(!released.contains("ka"));
        let d = s.push(&c, "boom!").unwrap_err();
        assert_eq!(d.rule, "w");
    }

    #[test]
    fn stream_is_utf8_safe() {
        let mut s = StreamScanner::new(&[pii()], 5);
        let c = ctx(Stage::Response);
        let mut out = String::new();
        for chunk in ["héllo wörld ", "日本語のテキスト", "…"] {
            out += &s.push(&c, chunk).unwrap();
        }
        out += &s.finish(&c).unwrap();
        assert_eq!(out, "héllo wörld 日本語のテキスト…");
    }
}
