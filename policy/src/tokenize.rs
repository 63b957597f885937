//! A model's tokenizer and chat template, loaded from Hugging Face files.
//!
//! `tokenizer.json` goes to the `tokenizers` crate (the reference encoder vLLM uses through HF);
//! the chat template comes from `tokenizer_config.json` (or `chat_template.jinja` beside it) and
//! is rendered with minijinja plus Python-compatible string methods, the way HF's
//! `apply_chat_template` renders it with Jinja2.
//!
//! Encoding is CPU-bound (microseconds per token on a production vocabulary): callers on an async
//! runtime run it on a blocking thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::chat::{self, ChatInputs, ContentFormat};
use crate::error::PolicyError;
use crate::pyjson;
use crate::request::ChatMessage;

/// The small byte-level BPE tokenizer compiled into the binary (`scripts/make-tiny-tokenizer.py`)
/// so a node and its embedded simulator work with no model files at hand.
pub const BUILTIN_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/tiny-chat/tokenizer.json");
pub const BUILTIN_TOKENIZER_CONFIG: &[u8] = include_bytes!("../assets/tiny-chat/tokenizer_config.json");

/// Default for models whose `tokenizer_config.json` gives no usable `model_max_length`.
pub const DEFAULT_MAX_MODEL_LEN: u32 = 32_768;

/// The files a model's tokenizer is made of, read once: the reference encoder, the fast encoder
/// and the chat template are all built from them.
pub struct TokenizerFiles {
    pub json: Vec<u8>,
    pub config: Option<Vec<u8>>,
    /// A chat template that overrides the one in `tokenizer_config.json`.
    pub chat_template: Option<String>,
    /// Where they came from, for messages.
    pub source: String,
}

impl TokenizerFiles {
    pub fn builtin() -> Self {
        Self {
            json: BUILTIN_TOKENIZER_JSON.to_vec(),
            config: Some(BUILTIN_TOKENIZER_CONFIG.to_vec()),
            chat_template: None,
            source: "builtin tiny-chat".into(),
        }
    }

    /// `path` is `tokenizer.json` or a directory holding it; `tokenizer_config.json` and
    /// `chat_template.jinja` beside it are read when present. `chat_template`, when given, is a
    /// Jinja file that wins over both.
    pub fn read(path: &Path, chat_template: Option<&Path>) -> Result<Self, PolicyError> {
        let (dir, json_path) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer.json"))
        } else {
            (path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")), path.to_path_buf())
        };
        let json = read(&json_path)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() { Some(read(&config_path)?) } else { None };
        let jinja_path = match chat_template {
            Some(p) => Some(p.to_path_buf()),
            None => Some(dir.join("chat_template.jinja")).filter(|p| p.exists()),
        };
        let chat_template = match jinja_path {
            Some(p) => Some(String::from_utf8_lossy(&read(&p)?).into_owned()),
            None => None,
        };
        Ok(Self { json, config, chat_template, source: json_path.display().to_string() })
    }
}

#[derive(Clone)]
pub struct ModelTokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    eos_token_id: Option<u32>,
    /// `model_max_length` from `tokenizer_config.json`, when it gives a usable one.
    declared_max_model_len: Option<u32>,
    source: String,
}

struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// Special tokens transformers passes to every render (`bos_token`, `eos_token`,
    /// `unk_token`, `pad_token`, ... from the tokenizer config).
    special: serde_json::Map<String, Value>,
    format: ContentFormat,
    /// The template's text (`continue_final_message` needs it to read `content`).
    source: String,
}

impl ModelTokenizer {
    /// The tokenizer compiled into the binary.
    pub fn builtin() -> Result<Self, PolicyError> {
        Self::from_files(&TokenizerFiles::builtin())
    }

    /// Loads `tokenizer.json` from `path` (a file, or a directory holding it), with
    /// `tokenizer_config.json` and `chat_template.jinja` from the same directory when present.
    pub fn from_path(path: &Path) -> Result<Self, PolicyError> {
        Self::from_files(&TokenizerFiles::read(path, None)?)
    }

    pub fn from_files(files: &TokenizerFiles) -> Result<Self, PolicyError> {
        let source = files.source.clone();
        let mut tokenizer = Tokenizer::from_bytes(&files.json)
            .map_err(|e| PolicyError::Tokenizer { what: source.clone(), message: e.to_string() })?;
        // A prompt's ids are all of its ids: vLLM does not truncate or pad a prompt through
        // tokenizer.json's settings, so neither do we.
        tokenizer
            .with_truncation(None)
            .map_err(|e| PolicyError::Tokenizer { what: source.clone(), message: e.to_string() })?;
        tokenizer.with_padding(None);
        let config: Value = match &files.config {
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| PolicyError::TokenizerConfig { path: source.clone(), message: e.to_string() })?,
            None => Value::Null,
        };
        let eos_token = special_token(&config, "eos_token");
        let eos_token_id = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let mut special = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] {
            if let Some(t) = special_token(&config, key) {
                special.insert(key.into(), Value::String(t));
            }
        }
        if let Some(Value::Array(extra)) = config.get("additional_special_tokens") {
            let names: Vec<Value> = extra
                .iter()
                .filter_map(|t| match t {
                    Value::String(s) => Some(Value::String(s.clone())),
                    Value::Object(o) => o.get("content").cloned(),
                    _ => None,
                })
                .collect();
            special.insert("additional_special_tokens".into(), Value::Array(names));
        }
        let declared_max_model_len = config
            .get("model_max_length")
            .and_then(Value::as_u64)
            .filter(|&n| n > 0 && n <= 16_777_216)
            .map(|n| n as u32);
        let source_text = files.chat_template.clone().or_else(|| template_from_config(&config));
        let template = match source_text {
            Some(text) => Some(ChatTemplate::new(text, special)?),
            None => None,
        };
        Ok(Self { inner: Arc::new(Inner { tokenizer, template, eos_token_id, declared_max_model_len, source }) })
    }

    /// The reference `tokenizers` encoder itself.
    pub fn reference(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    pub fn source(&self) -> &str {
        &self.inner.source
    }

    pub fn max_model_len(&self) -> u32 {
        self.inner.declared_max_model_len.unwrap_or(DEFAULT_MAX_MODEL_LEN)
    }

    /// The context length the tokenizer's config states, if it states one.
    pub fn declared_max_model_len(&self) -> Option<u32> {
        self.inner.declared_max_model_len
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_token_id
    }

    pub fn vocab_size(&self) -> u32 {
        self.inner.tokenizer.get_vocab_size(true) as u32
    }

    pub fn has_chat_template(&self) -> bool {
        self.inner.template.is_some()
    }

    /// The prompt text of plain messages (role and text only).
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, PolicyError> {
        let inputs = ChatInputs {
            messages: messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect(),
            add_generation_prompt,
            ..ChatInputs::default()
        };
        self.render(&inputs)
    }

    /// The prompt text a chat request turns into, exactly as the engine renders it: the
    /// template given what vLLM gives it (`chat`).
    pub fn render(&self, inputs: &ChatInputs) -> Result<String, PolicyError> {
        let Some(t) = &self.inner.template else {
            return Err(PolicyError::Template(format!(
                "{} has no chat template; give the model's tokenizer_config.json or chat_template.jinja",
                self.inner.source
            )));
        };
        t.render(inputs)
    }

    /// Token ids of `text`. `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (e.g. a BOS): vLLM does so for `/v1/completions` and not for rendered chat prompts, whose
    /// template already wrote them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, PolicyError> {
        self.inner
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PolicyError::Tokenizer { what: self.inner.source.clone(), message: e.to_string() })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, PolicyError> {
        self.inner
            .tokenizer
            .decode(ids, true)
            .map_err(|e| PolicyError::Tokenizer { what: self.inner.source.clone(), message: e.to_string() })
    }

    /// The text of one vocabulary entry as it appears in output, if it decodes on its own to
    /// plain ASCII (used by the simulator to produce readable filler).
    pub fn plain_token_text(&self, id: u32) -> Option<String> {
        let text = self.inner.tokenizer.decode(&[id], true).ok()?;
        (!text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == ',' || c == '.'))
            .then_some(text)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PolicyError> {
    std::fs::read(path).map_err(|source| PolicyError::Io { path: path.display().to_string(), source })
}

/// `bos_token`/`eos_token` are a string or an AddedToken object `{"content": ...}`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `chat_template` is a string or a list of `{name, template}`; the one named "default" wins.
fn template_from_config(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let named = |n: &str| items.iter().find(|i| i.get("name").and_then(Value::as_str) == Some(n));
            named("default")
                .or_else(|| items.first())
                .and_then(|i| i.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        }
        _ => None,
    }
}

/// Python's `strftime` for the directives chat templates use, in UTC (vLLM's servers usually
/// run in UTC containers); anything else is copied as is.
fn strftime_utc(fmt: &str, at: std::time::SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let secs = at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month_name = MONTHS[(month - 1) as usize];
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('-') if chars.clone().next() == Some('d') => {
                chars.next();
                out.push_str(&day.to_string());
            }
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// transformers' `tojson`: `json.dumps` with `ensure_ascii=False` and Python's spacing
/// (`pyjson`), taking `indent`, `ensure_ascii`, `separators` and `sort_keys` as keywords.
fn py_tojson(value: &minijinja::Value, kwargs: minijinja::value::Kwargs) -> Result<minijinja::Value, minijinja::Error> {
    if value.is_undefined() {
        // json.dumps of Jinja2's Undefined raises.
        return Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, "tojson of an undefined value"));
    }
    let json = serde_json::to_value(value)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    let mut opts = pyjson::Options::default();
    if let Some(indent) = kwargs.get::<Option<minijinja::Value>>("indent")? {
        opts.indent = match indent.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => indent.as_str().map(str::to_owned),
        };
    }
    if let Some(ascii) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        opts.ensure_ascii = ascii;
    }
    if let Some(sort) = kwargs.get::<Option<bool>>("sort_keys")? {
        opts.sort_keys = sort;
    }
    if let Some(seps) = kwargs.get::<Option<Vec<String>>>("separators")? {
        if let [item, key] = seps.as_slice() {
            opts.separators = Some((item.clone(), key.clone()));
        }
    }
    kwargs.assert_all_used()?;
    Ok(minijinja::Value::from_safe_string(pyjson::dumps(&json, &opts)))
}

/// Jinja2's `join`: items printed with `str()` (`True`, `1e+16`), optionally an attribute of each.
fn py_join(
    value: &minijinja::Value,
    sep: Option<String>,
    kwargs: minijinja::value::Kwargs,
) -> Result<String, minijinja::Error> {
    let attribute: Option<String> = kwargs.get("attribute")?;
    let sep = sep.or(kwargs.get::<Option<String>>("d")?).unwrap_or_default();
    kwargs.assert_all_used()?;
    if let Some(s) = value.as_str() {
        // A string joins its characters.
        return Ok(s.chars().map(String::from).collect::<Vec<_>>().join(&sep));
    }
    let items: Vec<String> = value
        .try_iter()?
        .map(|item| match &attribute {
            Some(a) => item.get_attr(a).map(|v| py_str(&v)),
            None => Ok(py_str(&item)),
        })
        .collect::<Result<_, _>>()?;
    Ok(items.join(&sep))
}

/// A template value as Python's `str()` prints it (`pyjson::py_str`); undefined prints nothing.
fn py_str(v: &minijinja::Value) -> String {
    if v.is_undefined() {
        return String::new();
    }
    if let Some(s) = v.as_str() {
        return s.to_owned();
    }
    match serde_json::to_value(v) {
        Ok(json) => pyjson::py_str(&json),
        Err(_) => v.to_string(),
    }
}

impl ChatTemplate {
    fn new(source: String, special: serde_json::Map<String, Value>) -> Result<Self, PolicyError> {
        let format = chat::detect_content_format(&source);
        let mut env = minijinja::Environment::new();
        // HF renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        // Templates (Llama 3.x, Mistral, Granite) write today's date into the system header;
        // the engine renders it with the real date, so must we, or no block key would match.
        env.add_function("strftime_now", |fmt: String| -> String { strftime_utc(&fmt, std::time::SystemTime::now()) });
        env.add_filter("tojson", py_tojson);
        // Jinja2's tests, by Python's types: `None` is neither iterable nor a sequence (minijinja
        // would iterate it as empty), a dict is a sequence (it has a length and items).
        // Jinja2's Undefined is iterable and a sequence (it iterates as empty).
        env.add_test("iterable", |v: &minijinja::Value| {
            use minijinja::value::ValueKind;
            matches!(
                v.kind(),
                ValueKind::Seq | ValueKind::Map | ValueKind::String | ValueKind::Iterable | ValueKind::Undefined
            )
        });
        env.add_test("sequence", |v: &minijinja::Value| {
            use minijinja::value::ValueKind;
            matches!(v.kind(), ValueKind::Seq | ValueKind::Map | ValueKind::String | ValueKind::Undefined)
        });
        env.add_filter("join", py_join);
        env.add_filter("string", |v: &minijinja::Value| -> Result<String, minijinja::Error> { Ok(py_str(v)) });
        // Jinja2 prints a value with Python's `str()`: `True`, `None`, `{'a': 1}`.
        env.set_formatter(|out, _state, value| {
            if value.is_undefined() {
                return Ok(());
            }
            out.write_str(&py_str(value))
                .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, e.to_string()))
        });
        env.add_template_owned("chat", source.clone()).map_err(|e| PolicyError::Template(e.to_string()))?;
        Ok(Self { env, special, format, source })
    }

    /// As transformers' `apply_chat_template` renders for vLLM: the special tokens, then
    /// `chat_template_kwargs` (which may override them), then `messages`, `tools`,
    /// `documents` and `add_generation_prompt`; `continue_final_message` cuts the text after
    /// the last message's content.
    fn render(&self, inputs: &ChatInputs) -> Result<String, PolicyError> {
        let tmpl = self.env.get_template("chat").map_err(|e| PolicyError::Template(e.to_string()))?;
        let mut conversation = chat::alias_reasoning(chat::conversation(&inputs.messages, self.format));
        let final_text = if inputs.continue_final_message {
            if !self.source.contains("content") {
                return Err(PolicyError::Template(
                    "continue_final_message is set but the chat template never reads `content`".into(),
                ));
            }
            Some(chat::tag_final_message(&mut conversation).ok_or_else(|| {
                PolicyError::Template("continue_final_message is set but the final message has no text".into())
            })?)
        } else {
            None
        };
        let mut ctx = self.special.clone();
        for (k, v) in &inputs.kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::Array(conversation));
        ctx.insert("tools".into(), inputs.tools.clone().map(Value::Array).unwrap_or(Value::Null));
        ctx.insert("documents".into(), inputs.documents.clone().unwrap_or(Value::Null));
        ctx.insert("add_generation_prompt".into(), Value::Bool(inputs.add_generation_prompt));
        let text =
            tmpl.render(minijinja::Value::from_serialize(&ctx)).map_err(|e| PolicyError::Template(e.to_string()))?;
        let Some(final_text) = final_text else { return Ok(text) };
        chat::cut_at_tag(&text, &final_text).ok_or_else(|| {
            PolicyError::Template(
                "continue_final_message is set but the final message does not appear in the rendered chat".into(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn builtin_renders_chatml_and_counts_tokens() {
        let t = ModelTokenizer::builtin().unwrap();
        let text = t.render_chat(&[msg("system", "Be brief."), msg("user", "Hello there")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = t.encode(&text, false).unwrap();
        // Special tokens are single ids, and the text round-trips.
        let start = t.inner.tokenizer.token_to_id("<|im_start|>").unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == start).count(), 3);
        assert_eq!(t.inner.tokenizer.decode(&ids, false).unwrap(), text);
        assert_eq!(t.eos_token_id(), t.inner.tokenizer.token_to_id("<|im_end|>"));
    }

    #[test]
    fn template_errors_are_reported() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}".into(), serde_json::Map::new()).unwrap();
        let inputs =
            ChatInputs { messages: vec![serde_json::json!({"role": "user", "content": "x"})], ..ChatInputs::default() };
        let err = t.render(&inputs).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_709_211_909);
        assert_eq!(strftime_utc("%d %b %Y", at), "29 Feb 2024");
        assert_eq!(strftime_utc("%A %B %-d, %y %H:%M:%S %% %Q", at), "Thursday February 29, 24 13:05:09 % %Q");
        let epoch = std::time::UNIX_EPOCH;
        assert_eq!(strftime_utc("%Y-%m-%d %a", epoch), "1970-01-01 Thu");
    }

    #[test]
    fn template_list_picks_default() {
        let cfg =
            serde_json::json!({"chat_template":[{"name":"tool_use","template":"T"},{"name":"default","template":"D"}]});
        assert_eq!(template_from_config(&cfg).as_deref(), Some("D"));
    }
}
