use thiserror::Error;

/// Failures of this crate. Request-level problems that a client must see are
/// [`crate::openai::ApiError`]s instead; these are about loading models and templates.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer {what}: {message}")]
    Tokenizer { what: String, message: String },
    #[error("tokenizer_config.json {path}: {message}")]
    TokenizerConfig { path: String, message: String },
    #[error("chat template: {0}")]
    Template(String),
    /// An API key entry is unusable; the message names it and says what to fix.
    #[error("API keys: {0}")]
    Keys(String),
    /// A guardrail or limit is misconfigured; the message names it and says what to fix.
    #[error("guardrails: {0}")]
    Guardrail(String),
}
