//! `kvmesh bench tokenize`: what a prompt's token ids cost on one core, for the reference
//! encoder (`tokenizers`), the segment cache over the reference, and the segment cache over the
//! verified fast encoder (the node's default), cold and warm, in the same run.
//!
//! Prompts are multi-turn chats rendered with a chat template, each made of fresh pseudo-prose
//! (words, numbers, punctuation, code), so "cold" really is text never seen; "warm" encodes a
//! chat whose every message but the last was encoded before, as in the next turn of a
//! conversation or a request sharing a system prompt and documents.

use std::path::PathBuf;
use std::time::Instant;

use hdrhistogram::Histogram;
use kvmesh_policy::prompt_encoder::{EncoderChoice, EncoderOptions, PromptEncoder};
use kvmesh_policy::request::ChatMessage;
use kvmesh_policy::tokenize::TokenizerFiles;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use kvmesh_node::NodeError;

/// A DeepSeek-style template, for tokenizers that ship none (the shared production tokenizer):
/// special tokens between messages, as every real template has.
pub const DEEPSEEK_STYLE_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}\
{{ m.content }}\n\n{% elif m.role == 'user' %}<｜User｜>{{ m.content }}{% else %}<｜Assistant｜>{{ m.content }}\
<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}";

#[derive(Debug, Clone, clap::Args)]
pub struct TokenizeArgs {
    /// Directory with the model's tokenizer.json (and tokenizer_config.json).
    #[arg(long, default_value = "../shared/tokenizers/deepseek-v4")]
    pub tokenizer: PathBuf,
    /// Jinja chat template; the tokenizer's own when it has one, else a DeepSeek-style one.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Prompt sizes in tokens (approximate).
    #[arg(long, value_delimiter = ',', default_value = "2000,8000,32000")]
    pub sizes: Vec<usize>,
    /// Prompts per size and mode.
    #[arg(long, default_value_t = 40)]
    pub iterations: usize,
    /// Messages per conversation.
    #[arg(long, default_value_t = 8)]
    pub messages: usize,
    /// Markdown file whose `tokenize` section is replaced with the results.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const WORDS: &[&str] = &[
    "the",
    "cache",
    "of",
    "a",
    "prefix",
    "routing",
    "request",
    "engine",
    "and",
    "latency",
    "is",
    "token",
    "model",
    "which",
    "decode",
    "prefill",
    "we",
    "measure",
    "throughput",
    "under",
    "load",
    "with",
    "memory",
    "blocks",
    "when",
    "gossip",
    "peers",
    "network",
    "summary",
    "filter",
    "tenant",
    "audit",
    "stream",
    "response",
    "prompt",
    "system",
    "document",
    "retrieval",
    "answer",
    "question",
    "context",
    "window",
    "budget",
    "scheduler",
    "batch",
    "queue",
    "Kubernetes",
    "cluster",
    "operator",
    "deployment",
    "performance",
    "regression",
    "benchmark",
    "experiment",
];

/// Pseudo-prose of about `tokens` tokens (a word is ~1.3 tokens here), deterministic per seed.
fn prose(rng: &mut SmallRng, tokens: usize) -> String {
    let mut s = String::new();
    let words = tokens * 10 / 13;
    for i in 0..words {
        let w = WORDS[rng.random_range(0..WORDS.len())];
        if i % 12 == 0 && i > 0 {
            s.push_str(". ");
            let mut c = w.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
        } else {
            s.push(' ');
            s.push_str(w);
        }
        match rng.random_range(0..40) {
            0 => s.push_str(&format!(" {}", rng.random_range(0..100_000))),
            1 => s.push_str(&format!(" `x_{}[i]`", rng.random_range(0..100))),
            2 => s.push_str(", "),
            3 => s.push_str("\n\n"),
            _ => {}
        }
    }
    s.push('.');
    s
}

pub fn conversation(seed: u64, tokens: usize, messages: usize) -> Vec<ChatMessage> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let per = tokens / messages.max(1);
    (0..messages.max(1))
        .map(|i| {
            let role = match i {
                0 => "system",
                i if i % 2 == 1 => "user",
                _ => "assistant",
            };
            ChatMessage { role: role.into(), content: prose(&mut rng, per) }
        })
        .collect()
}

struct Row {
    size: usize,
    mode: &'static str,
    state: &'static str,
    tokens: f64,
    us_per_token_p50: f64,
    us_per_token_p99: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("valid sigfig"))
}

pub async fn run(a: TokenizeArgs) -> Result<(), NodeError> {
    tokio::task::spawn_blocking(move || run_blocking(a)).await.map_err(|e| NodeError::Bench(e.to_string()))?
}

fn run_blocking(a: TokenizeArgs) -> Result<(), NodeError> {
    if !a.tokenizer.join("tokenizer.json").exists() && !a.tokenizer.is_file() {
        return Err(NodeError::Bench(format!(
            "no tokenizer.json at {}: pass --tokenizer DIR (the project's shared material has one at \
             ../shared/tokenizers/deepseek-v4)",
            a.tokenizer.display()
        )));
    }
    let mut files =
        TokenizerFiles::read(&a.tokenizer, a.chat_template.as_deref()).map_err(|e| NodeError::Bench(e.to_string()))?;
    let load = |files: &TokenizerFiles, encoder: EncoderChoice, cache_mb: u64| {
        PromptEncoder::new(files, &EncoderOptions { encoder, segment_cache_bytes: cache_mb << 20 })
            .map_err(|e| NodeError::Bench(e.to_string()))
    };
    let probe = load(&files, EncoderChoice::Reference, 0)?;
    if !probe.tokenizer().has_chat_template() {
        files.chat_template = Some(DEEPSEEK_STYLE_TEMPLATE.into());
    }
    let started = Instant::now();
    let fast = load(&files, EncoderChoice::Auto, 256)?;
    let load_s = started.elapsed().as_secs_f64();
    let segmented = load(&files, EncoderChoice::Reference, 256)?;
    let reference = fast.tokenizer().clone();
    println!("tokenizer {} loaded and checked in {load_s:.2} s; {:?}", files.source, fast.report());

    let mut rows = Vec::new();
    for &size in &a.sizes {
        // Same prompts for every mode; the warm runs use other conversations than the cold ones,
        // so nothing a cold run cached makes a warm run's last message look seen.
        let convs = |state: u64| -> Vec<_> {
            (0..a.iterations).map(|i| conversation((size * 1000 + i) as u64 * 2 + state, size, a.messages)).collect()
        };
        let (cold_convs, warm_convs) = (convs(0), convs(1));
        type Encode<'a> = Box<dyn Fn(&[ChatMessage]) -> Result<usize, NodeError> + 'a>;
        let modes: Vec<(&'static str, Encode)> = vec![
            (
                "reference (tokenizers, whole prompt)",
                Box::new(|m: &[ChatMessage]| {
                    let text = reference.render_chat(m, true).map_err(|e| NodeError::Bench(e.to_string()))?;
                    reference.encode(&text, false).map(|ids| ids.len()).map_err(|e| NodeError::Bench(e.to_string()))
                }),
            ),
            (
                "segment cache + reference",
                Box::new(|m: &[ChatMessage]| {
                    segmented.encode_chat(m, true).map(|e| e.ids.len()).map_err(|e| NodeError::Bench(e.to_string()))
                }),
            ),
            (
                if fast.report().fast_encoder {
                    "segment cache + fast encoder (default)"
                } else {
                    "default (fast encoder rejected at start)"
                },
                Box::new(|m: &[ChatMessage]| {
                    fast.encode_chat(m, true).map(|e| e.ids.len()).map_err(|e| NodeError::Bench(e.to_string()))
                }),
            ),
        ];
        for (mode, encode) in &modes {
            for warm in [false, true] {
                let (mut lat, mut per_tok) = (hist(), hist());
                let mut tokens = 0usize;
                let convs = if warm { &warm_convs } else { &cold_convs };
                for conv in convs {
                    if warm {
                        // The previous turn: everything but the last message.
                        encode(&conv[..conv.len() - 1])?;
                    }
                    // Cold prompts are new text each time; the reference has no cache to clear.
                    let t = Instant::now();
                    let n = encode(conv)?;
                    let ns = t.elapsed().as_nanos() as u64;
                    tokens += n;
                    let _ = lat.record(ns.max(1));
                    let _ = per_tok.record((ns * 1000 / n.max(1) as u64).max(1));
                }
                rows.push(Row {
                    size,
                    mode,
                    state: if warm { "warm" } else { "cold" },
                    tokens: tokens as f64 / convs.len() as f64,
                    us_per_token_p50: per_tok.value_at_quantile(0.5) as f64 / 1e6,
                    us_per_token_p99: per_tok.value_at_quantile(0.99) as f64 / 1e6,
                    p50_ms: lat.value_at_quantile(0.5) as f64 / 1e6,
                    p99_ms: lat.value_at_quantile(0.99) as f64 / 1e6,
                });
                let r = rows.last().expect("just pushed");
                println!(
                    "{size:>6} {:<42} {:<4} {:>7.0} tok  {:.3}/{:.3} us/tok  p50 {:.3} ms  p99 {:.3} ms",
                    r.mode, r.state, r.tokens, r.us_per_token_p50, r.us_per_token_p99, r.p50_ms, r.p99_ms
                );
            }
        }
    }

    let mut md = format!(
        "Command: `kvmesh bench tokenize --tokenizer {} --iterations {} --messages {}` (release build, one thread; \
         tokenizer `{}`; fast encoder verified: {}; loading and start-up checks took {load_s:.2} s). Prompts are \
         {}-message chats of fresh pseudo-prose rendered with a chat template; *cold* = never seen, *warm* = every \
         message but the last seen in the previous turn. µs/token is per prompt (time / its tokens).\n\n",
        a.tokenizer.display(),
        a.iterations,
        a.messages,
        files.source,
        fast.report().fast_encoder,
        a.messages
    );
    md.push_str(
        "| prompt | encoder | state | µs/token p50 | µs/token p99 | p50 | p99 |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {:.0} tok | {} | {} | {:.3} | {:.3} | {:.3} ms | {:.3} ms |\n",
            r.tokens, r.mode, r.state, r.us_per_token_p50, r.us_per_token_p99, r.p50_ms, r.p99_ms
        ));
    }
    let ratio = |size: usize, state: &str| {
        let of = |mode_prefix: &str| {
            rows.iter()
                .find(|r| r.size == size && r.state == state && r.mode.starts_with(mode_prefix))
                .map(|r| r.p99_ms)
        };
        match (of("reference"), rows.iter().rev().find(|r| r.size == size && r.state == state).map(|r| r.p99_ms)) {
            (Some(base), Some(x)) if x > 0.0 => format!("{:.1}x", base / x),
            _ => "n/a".into(),
        }
    };
    md.push_str("\nSpeed-up of the default over the reference at p99 (same prompts, same run):");
    for &size in &a.sizes {
        md.push_str(&format!(" {size} tokens cold {}, warm {};", ratio(size, "cold"), ratio(size, "warm")));
    }
    md.push_str(&format!(
        "\n\nSegment cache after the run: {:.1} MiB for the default encoder (bound 256 MiB), holding the ids of every \
         segment seen.\n",
        fast.cache_bytes() as f64 / (1 << 20) as f64
    ));
    println!("{md}");
    if let Some(path) = &a.out {
        crate::cli::bench::write_section(path, "tokenize", "Tokenizing a prompt", &md)?;
        println!("written to {}", path.display());
    }
    Ok(())
}
