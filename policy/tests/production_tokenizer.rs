//! The prompt encoder against a production tokenizer (128k-vocabulary byte-level BPE) when the
//! project's shared material is at hand (`../shared/tokenizers/deepseek-v4`, or the directory in
//! `KVMESH_TEST_TOKENIZER`). A user's clone has no such files; the test then says so and passes
//! without checking anything, and the builtin-tokenizer tests in `prompt_encoder` still run.

use std::path::PathBuf;
use std::sync::OnceLock;

use kvmesh_policy::prompt_encoder::{EncoderOptions, PromptEncoder};
use kvmesh_policy::request::ChatMessage;
use kvmesh_policy::tokenize::TokenizerFiles;
use proptest::prelude::*;

/// A DeepSeek-style chat template: the tokenizer ships none, and the test needs special tokens
/// between messages like every real template has.
pub const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n\n\
{% elif m.role == 'user' %}<｜User｜>{{ m.content }}{% else %}<｜Assistant｜>{{ m.content }}<｜end▁of▁sentence｜>\
{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}";

fn tokenizer_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("KVMESH_TEST_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tokenizers/deepseek-v4"));
    if dir.join("tokenizer.json").exists() {
        Some(dir)
    } else {
        eprintln!("skipped: no production tokenizer at {} (set KVMESH_TEST_TOKENIZER)", dir.display());
        None
    }
}

/// Loaded once: building it (and its start-up checks) takes about a second.
fn encoder() -> Option<&'static PromptEncoder> {
    static ENCODER: OnceLock<Option<PromptEncoder>> = OnceLock::new();
    ENCODER
        .get_or_init(|| {
            let dir = tokenizer_dir()?;
            let mut files = TokenizerFiles::read(&dir, None).unwrap();
            files.chat_template = Some(TEMPLATE.into());
            Some(PromptEncoder::new(&files, &EncoderOptions::default()).unwrap())
        })
        .as_ref()
}

#[test]
fn production_tokenizer_passes_start_checks() {
    let Some(e) = encoder() else { return };
    let r = e.report();
    assert!(r.fast_encoder && r.segment_cache && r.special_affix, "{r:?}");
}

fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z ,.!?']{0,60}",
        "[ \t\n\r]{1,6}",
        "[0-9.,]{1,12}",
        "[\u{4e00}-\u{4e40}\u{3040}-\u{3060}\u{ac00}-\u{ac20}]{1,8}",
        Just("👩‍👩‍👧🎉 ".to_string()),
        Just("fn x() { return y[0]; }\n".to_string()),
        Just("<｜User｜>".to_string()),
        Just("<｜end▁of▁sentence｜>".to_string()),
        Just("<｜User".to_string()),
        Just("<|im_start|>".to_string()),
        "\\PC{0,8}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn cached_fast_path_equals_reference(
        conv in prop::collection::vec((0..3usize, prop::collection::vec(fragment(), 0..6)), 1..8),
        gen in any::<bool>(),
    ) {
        let Some(e) = encoder() else { return Ok(()) };
        let roles = ["system", "user", "assistant"];
        let msgs: Vec<ChatMessage> =
            conv.into_iter().map(|(r, parts)| ChatMessage { role: roles[r].into(), content: parts.concat() }).collect();
        let text = e.tokenizer().render_chat(&msgs, gen).unwrap();
        let want = e.tokenizer().encode(&text, false).unwrap();
        prop_assert_eq!(&e.encode_chat(&msgs, gen).unwrap().ids, &want);
        prop_assert_eq!(&e.encode_chat(&msgs, gen).unwrap().ids, &want);
        prop_assert_eq!(e.encode(&text, true).unwrap().ids, e.tokenizer().encode(&text, true).unwrap());
    }
}
