//! A faster encoder for the same `tokenizer.json` (kitoken), used only where it has been shown
//! to give the reference encoder's ids: [`crate::prompt_encoder`] checks it against `tokenizers`
//! on a built-in corpus at start and falls back to the reference on any difference.

use crate::error::PolicyError;

pub struct FastEncoder {
    inner: kitoken::Kitoken,
}

impl FastEncoder {
    pub fn from_tokenizer_json(json: &[u8]) -> Result<Self, PolicyError> {
        let inner = kitoken::Kitoken::from_tokenizers_slice(json)
            .map_err(|e| PolicyError::Tokenizer { what: "fast encoder".into(), message: e.to_string() })?;
        Ok(Self { inner })
    }

    /// Ids of `text` with added tokens recognised and no post-processor (no BOS added): what
    /// the reference gives for `encode(text, false)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PolicyError> {
        self.inner
            .encode(text, true)
            .map_err(|e| PolicyError::Tokenizer { what: "fast encoder".into(), message: e.to_string() })
    }
}
