//! Token ids of a request's prompt at the node that receives it, for prefix matching.
//!
//! One tokenizer per model (`[[models]]` in config; the embedded simulator's model uses the
//! tokenizer compiled into kvmesh). Encoding runs on the blocking pool, never on the async
//! workers. A model without a configured tokenizer is routed by load alone. The faster
//! encoder and the segment cache are separate work; see ARCHITECTURE.md.

use std::collections::HashMap;

use kvmesh_policy::request::{InferenceRequest, Prompt};
use kvmesh_policy::tokenize::ModelTokenizer;

use crate::config::Config;
use crate::error::NodeError;

pub struct Tokenizers {
    by_model: HashMap<String, ModelTokenizer>,
}

impl Tokenizers {
    pub fn load(cfg: &Config) -> Result<Self, NodeError> {
        let mut by_model = HashMap::new();
        let builtin = ModelTokenizer::builtin().map_err(|e| NodeError::Config(e.to_string()))?;
        by_model.insert(cfg.embedded.model.clone(), builtin);
        for m in &cfg.models {
            let t = ModelTokenizer::from_path(&m.tokenizer)
                .map_err(|e| NodeError::Config(format!("[[models]] {}: {e}", m.name)))?;
            by_model.insert(m.name.clone(), t);
        }
        Ok(Self { by_model })
    }

    pub fn has(&self, model: &str) -> bool {
        self.by_model.contains_key(model)
    }

    /// The prompt's token ids as the engine will see them, or `None` when the model has no
    /// tokenizer here or the prompt does not render (the engine will say why).
    pub async fn prompt_ids(&self, req: &InferenceRequest) -> Option<Vec<u32>> {
        if let Prompt::TokenIds(ids) = &req.prompt {
            return Some(ids.clone());
        }
        let tok = self.by_model.get(&req.model)?.clone();
        let prompt = req.prompt.clone();
        let add_generation_prompt = req.add_generation_prompt;
        tokio::task::spawn_blocking(move || match &prompt {
            Prompt::Chat(messages) => tok.encode(&tok.render_chat(messages, add_generation_prompt).ok()?, false).ok(),
            Prompt::Text(text) => tok.encode(text, true).ok(),
            Prompt::TokenIds(ids) => Some(ids.clone()),
        })
        .await
        .ok()
        .flatten()
    }
}
