//! Which blocks a request for a model name can share: the names an engine serves (vLLM's
//! `/v1/models` cards) resolved to the identity its KV blocks are keyed under.
//!
//! vLLM's block hashes carry no model name: every name an engine serves for its base model
//! (`--served-model-name a b`: one card each, same `root`) shares the base model's blocks,
//! and a LoRA adapter's blocks (its card's `parent` is the base model) are hashed with the
//! adapter's name in every block's extra keys. So kvmesh keys a prompt under
//! `blocks::chain_seed(base, adapter, salt)`, where `base` is the base model's `root` (the
//! weights it was loaded from) and `adapter` the adapter's served name, never under the name a
//! client happened to use. Requests by alias then match the blocks stored for the engine's first
//! name; an adapter's requests match only its own blocks.
//!
//! Limits, stated: engines that load the same weights from different paths (`root`) key their
//! blocks apart, so a request matches on some and misses on others, never a false hit; a
//! model name no engine lists is keyed under its own name.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Most cards kept from one engine's `/v1/models` (or one peer's gossip for one engine): an
/// engine with many adapters lists them all, and nothing from an engine is unbounded.
pub const MAX_CARDS_PER_ENGINE: usize = 256;
/// Longest model name, root or parent kept from a card.
pub const MAX_NAME_BYTES: usize = 512;

/// One entry of an OpenAI-compatible `/v1/models` answer, as vLLM fills it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    /// What the model was loaded from (the weights' path or Hugging Face id; an adapter's path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Set for a LoRA adapter: the base model it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

impl ModelCard {
    pub fn base(id: &str) -> Self {
        Self { id: id.to_owned(), root: None, parent: None }
    }

    /// Whether this card is a LoRA adapter of another model.
    pub fn is_adapter(&self) -> bool {
        self.parent.is_some()
    }

    fn valid(&self) -> bool {
        let ok = |s: &str| !s.is_empty() && s.len() <= MAX_NAME_BYTES;
        ok(&self.id) && self.root.as_deref().is_none_or(ok) && self.parent.as_deref().is_none_or(ok)
    }
}

/// The cards of an OpenAI `/v1/models` answer (`{"data": [{"id", "root", "parent"}, ...]}`),
/// bounded and with malformed entries left out.
pub fn cards_from_models_answer(v: &serde_json::Value) -> Vec<ModelCard> {
    let Some(data) = v.get("data").and_then(serde_json::Value::as_array) else { return Vec::new() };
    let text = |m: &serde_json::Value, k: &str| m.get(k).and_then(serde_json::Value::as_str).map(str::to_owned);
    data.iter()
        .filter_map(|m| Some(ModelCard { id: text(m, "id")?, root: text(m, "root"), parent: text(m, "parent") }))
        .filter(ModelCard::valid)
        .take(MAX_CARDS_PER_ENGINE)
        .collect()
}

/// The identity a model name's KV blocks are keyed under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeySpace {
    /// The base model's weights (its card's `root`, else its name).
    pub base: String,
    /// The LoRA adapter's served name, for an adapter.
    pub adapter: Option<String>,
    /// The base model's served name: where its tokenizer and chat template are found (an
    /// adapter uses its base model's).
    pub base_name: String,
}

impl KeySpace {
    /// A name no engine lists: keyed under itself.
    pub fn unknown(model: &str) -> Self {
        Self { base: model.to_owned(), adapter: None, base_name: model.to_owned() }
    }

    /// The chain seed of a request in this key space with `cache_salt`.
    pub fn seed(&self, cache_salt: Option<&str>) -> u64 {
        crate::blocks::chain_seed(&self.base, self.adapter.as_deref(), cache_salt)
    }
}

/// One engine's cards resolved: the base identity its blocks are keyed under, and every name it
/// serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineModels {
    cards: Vec<ModelCard>,
}

impl EngineModels {
    pub fn new(mut cards: Vec<ModelCard>) -> Self {
        cards.retain(ModelCard::valid);
        cards.truncate(MAX_CARDS_PER_ENGINE);
        Self { cards }
    }

    pub fn cards(&self) -> &[ModelCard] {
        &self.cards
    }

    /// An engine known only by the names it serves (no cards): each a base model keyed under
    /// its own name.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a String>) -> Self {
        Self::new(names.into_iter().map(|n| ModelCard::base(n)).collect())
    }

    /// The cards worth gossiping: none when the names alone say it all (every card a base
    /// model keyed under its own name), which `from_names` rebuilds on the other side.
    pub fn gossip_cards(&self) -> Vec<ModelCard> {
        let trivial = self.cards.iter().all(|c| c.parent.is_none() && c.root.as_ref().is_none_or(|r| r == &c.id));
        if trivial {
            Vec::new()
        } else {
            self.cards.clone()
        }
    }

    /// The names served, in the engine's order.
    pub fn names(&self) -> Vec<String> {
        self.cards.iter().map(|c| c.id.clone()).collect()
    }

    /// The engine's base model: its first card that is not an adapter (vLLM lists the served
    /// names first, in the order given).
    pub fn base_card(&self) -> Option<&ModelCard> {
        self.cards.iter().find(|c| !c.is_adapter())
    }

    /// The identity of the engine's base-model blocks (events without `lora_name`).
    pub fn base_identity(&self) -> Option<String> {
        self.base_card().map(|c| c.root.clone().unwrap_or_else(|| c.id.clone()))
    }

    /// How this engine keys `model`'s blocks, if it serves it.
    pub fn key_space(&self, model: &str) -> Option<KeySpace> {
        let card = self.cards.iter().find(|c| c.id == model)?;
        let base_card = match &card.parent {
            None => card,
            // vLLM names the base model by its first served name; an engine that names a parent
            // it does not list falls back to its own base model.
            Some(p) => self.cards.iter().find(|c| &c.id == p && !c.is_adapter()).or(self.base_card())?,
        };
        Some(KeySpace {
            base: base_card.root.clone().unwrap_or_else(|| base_card.id.clone()),
            adapter: card.is_adapter().then(|| card.id.clone()),
            base_name: base_card.id.clone(),
        })
    }
}

/// Every model name the router knows of, resolved once when engines' cards change (the request
/// path only looks names up).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    by_name: HashMap<String, KeySpace>,
}

impl Catalog {
    /// The first engine (in the order given) to list a name decides its key space: callers put
    /// their own engines first.
    pub fn build<'a>(engines: impl IntoIterator<Item = &'a EngineModels>) -> Self {
        let mut by_name = HashMap::new();
        for e in engines {
            for c in e.cards() {
                if !by_name.contains_key(&c.id) {
                    if let Some(space) = e.key_space(&c.id) {
                        by_name.insert(c.id.clone(), space);
                    }
                }
            }
        }
        Self { by_name }
    }

    /// The key space of `model` (a name no engine lists keys under itself).
    pub fn resolve(&self, model: &str) -> KeySpace {
        self.by_name.get(model).cloned().unwrap_or_else(|| KeySpace::unknown(model))
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `/v1/models` as vLLM answers it for `vllm serve meta-llama/Llama-3.1-8B-Instruct
    /// --served-model-name llama llama-3 --enable-lora --lora-modules sql=/adapters/sql`
    /// (fields from vLLM's `OpenAIServingModels.show_available_models`).
    fn vllm_answer() -> serde_json::Value {
        json!({"object": "list", "data": [
            {"id": "llama", "object": "model", "root": "meta-llama/Llama-3.1-8B-Instruct", "parent": null, "max_model_len": 8192},
            {"id": "llama-3", "object": "model", "root": "meta-llama/Llama-3.1-8B-Instruct", "parent": null, "max_model_len": 8192},
            {"id": "sql", "object": "model", "root": "/adapters/sql", "parent": "llama"},
        ]})
    }

    #[test]
    fn aliases_share_the_base_identity_and_adapters_their_own() {
        let e = EngineModels::new(cards_from_models_answer(&vllm_answer()));
        let base = "meta-llama/Llama-3.1-8B-Instruct";
        assert_eq!(e.base_identity().as_deref(), Some(base));
        let alias = e.key_space("llama-3").unwrap();
        assert_eq!(alias.seed(None), e.key_space("llama").unwrap().seed(None), "aliases key alike");
        assert_eq!(alias.base, base);
        let sql = e.key_space("sql").unwrap();
        assert_eq!(sql.adapter.as_deref(), Some("sql"));
        assert_eq!(sql.base, base);
        assert_eq!(sql.base_name, "llama", "the adapter's tokenizer is its base model's");
        assert_ne!(sql.seed(None), alias.seed(None));
        assert_eq!(e.key_space("other"), None);
    }

    #[test]
    fn catalog_prefers_the_first_engine_and_keys_unknown_names_under_themselves() {
        let mine = EngineModels::new(cards_from_models_answer(&vllm_answer()));
        let theirs =
            EngineModels::new(vec![ModelCard { id: "llama".into(), root: Some("/other/path".into()), parent: None }]);
        let cat = Catalog::build([&mine, &theirs]);
        assert_eq!(cat.resolve("llama").base, "meta-llama/Llama-3.1-8B-Instruct");
        assert_eq!(cat.resolve("mistral"), KeySpace::unknown("mistral"));
        assert_eq!(cat.len(), 3);
    }

    #[test]
    fn malformed_and_oversized_cards_are_dropped() {
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let v = json!({"data": [{"id": ""}, {"id": long}, {"root": "r"}, {"id": "ok", "parent": 3}, "junk"]});
        let cards = cards_from_models_answer(&v);
        assert_eq!(cards, vec![ModelCard::base("ok")]);
        let many = json!({"data": (0..1000).map(|i| json!({"id": format!("m{i}")})).collect::<Vec<_>>()});
        assert_eq!(cards_from_models_answer(&many).len(), MAX_CARDS_PER_ENGINE);
    }
}
