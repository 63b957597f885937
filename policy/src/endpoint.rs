//! The endpoints of vLLM's OpenAI-compatible server that a node routes, and what each one's
//! request is: which path it is sent to, how its body is sent (JSON or a multipart form), and
//! what the router can key it on.
//!
//! Every route vLLM's API server registers for inference is here (see `docs/api.md` for the
//! table with vLLM's source files). Routes that are about one server rather than a model
//! (`/health`, `/metrics`, `/load`, `/is_sleeping`, the dev-mode routes) are answered by the node
//! itself or not exposed.

/// Which vLLM endpoint a request was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Chat,
    Completions,
    /// OpenAI's Responses API (`POST /v1/responses`).
    Responses,
    /// A stored response, by id (`GET /v1/responses/{id}`): served by the engine that stored it.
    ResponseRetrieve,
    /// `POST /v1/responses/{id}/cancel`: served by the engine that stored it.
    ResponseCancel,
    /// Anthropic's Messages API (`POST /v1/messages`).
    Messages,
    MessagesCountTokens,
    Embeddings,
    Pooling,
    Classify,
    Score,
    ScoreV1,
    Rerank,
    RerankV1,
    RerankV2,
    Tokenize,
    Detokenize,
    /// `multipart/form-data` with an audio `file`.
    Transcriptions,
    Translations,
}

/// What kind of work a request is, for the stages that treat them differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Generates tokens: completion limits, answer guardrails and `max_tokens` apply.
    Generate,
    /// A forward pass with no generated text (embeddings, scores).
    Pool,
    /// Tokenizer work: no engine time to speak of.
    Tokenizer,
    /// An operation on a stored response.
    Stored,
}

/// How an endpoint's errors are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    OpenAi,
    Anthropic,
}

impl Endpoint {
    /// Every endpoint, in the order `docs/api.md` lists them.
    pub const ALL: [Endpoint; 19] = [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Responses,
        Endpoint::ResponseRetrieve,
        Endpoint::ResponseCancel,
        Endpoint::Messages,
        Endpoint::MessagesCountTokens,
        Endpoint::Embeddings,
        Endpoint::Pooling,
        Endpoint::Classify,
        Endpoint::Score,
        Endpoint::ScoreV1,
        Endpoint::Rerank,
        Endpoint::RerankV1,
        Endpoint::RerankV2,
        Endpoint::Tokenize,
        Endpoint::Detokenize,
        Endpoint::Transcriptions,
        Endpoint::Translations,
    ];

    /// The path, as a route pattern (`{response_id}` where an id goes); also the metrics label.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Responses => "/v1/responses",
            Endpoint::ResponseRetrieve => "/v1/responses/{response_id}",
            Endpoint::ResponseCancel => "/v1/responses/{response_id}/cancel",
            Endpoint::Messages => "/v1/messages",
            Endpoint::MessagesCountTokens => "/v1/messages/count_tokens",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Pooling => "/pooling",
            Endpoint::Classify => "/classify",
            Endpoint::Score => "/score",
            Endpoint::ScoreV1 => "/v1/score",
            Endpoint::Rerank => "/rerank",
            Endpoint::RerankV1 => "/v1/rerank",
            Endpoint::RerankV2 => "/v2/rerank",
            Endpoint::Tokenize => "/tokenize",
            Endpoint::Detokenize => "/detokenize",
            Endpoint::Transcriptions => "/v1/audio/transcriptions",
            Endpoint::Translations => "/v1/audio/translations",
        }
    }

    /// The HTTP method the engine is called with.
    pub fn is_get(self) -> bool {
        self == Endpoint::ResponseRetrieve
    }

    /// The endpoint a concrete path is, with the response id where the path carries one.
    pub fn from_path(path: &str) -> Option<(Endpoint, Option<&str>)> {
        if let Some(rest) = path.strip_prefix("/v1/responses/") {
            let (id, ep) = match rest.strip_suffix("/cancel") {
                Some(id) => (id, Endpoint::ResponseCancel),
                None => (rest, Endpoint::ResponseRetrieve),
            };
            return is_response_id(id).then_some((ep, Some(id)));
        }
        Endpoint::ALL.into_iter().find(|e| !e.path().contains('{') && e.path() == path).map(|e| (e, None))
    }

    pub fn work(self) -> Work {
        match self {
            Endpoint::Chat
            | Endpoint::Completions
            | Endpoint::Responses
            | Endpoint::Messages
            | Endpoint::Transcriptions
            | Endpoint::Translations => Work::Generate,
            Endpoint::Embeddings
            | Endpoint::Pooling
            | Endpoint::Classify
            | Endpoint::Score
            | Endpoint::ScoreV1
            | Endpoint::Rerank
            | Endpoint::RerankV1
            | Endpoint::RerankV2 => Work::Pool,
            Endpoint::Tokenize | Endpoint::Detokenize | Endpoint::MessagesCountTokens => Work::Tokenizer,
            Endpoint::ResponseRetrieve | Endpoint::ResponseCancel => Work::Stored,
        }
    }

    pub fn error_shape(self) -> ErrorShape {
        match self {
            Endpoint::Messages | Endpoint::MessagesCountTokens => ErrorShape::Anthropic,
            _ => ErrorShape::OpenAi,
        }
    }

    /// A streamed answer carries usage only when the request asks (`stream_options.
    /// include_usage`): chat and completions. Responses and Messages always end with it.
    pub fn reports_usage_on_request(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }

    /// A request may leave `model` out (vLLM serves its one model then); chat, completions and
    /// Messages must name it.
    pub fn may_omit_model(self) -> bool {
        !matches!(self, Endpoint::Chat | Endpoint::Completions | Endpoint::Messages)
    }

    /// The body is a multipart form rather than JSON.
    pub fn is_multipart(self) -> bool {
        matches!(self, Endpoint::Transcriptions | Endpoint::Translations)
    }
}

/// Longest response id a node accepts in a path or a `previous_response_id`.
pub const MAX_RESPONSE_ID: usize = 128;

/// An id a path may carry: bounded, and of the characters ids are made of (no `/`, `%`, `?`).
pub fn is_response_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_RESPONSE_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_maps_back_to_its_endpoint() {
        for e in Endpoint::ALL {
            let concrete = e.path().replace("{response_id}", "resp_abc");
            let (back, id) = Endpoint::from_path(&concrete).unwrap();
            assert_eq!(back, e, "{concrete}");
            assert_eq!(id.is_some(), e.path().contains('{'));
        }
        assert_eq!(Endpoint::from_path("/v1/nope"), None);
        assert_eq!(Endpoint::from_path("/v1/responses/a%2Fb"), None, "ids are plain");
        assert_eq!(Endpoint::from_path("/v1/responses/"), None);
    }
}
