//! The engine routes pool-managerd's proxy passes, each with the body fields it lets through:
//! one list, read by the proxy (which refuses anything else) and by orchestratord's tests
//! (every body it writes must pass), so the two cannot drift apart.

/// One engine route the proxy passes: its path, the body fields orchestratord writes (an OpenAI
/// generation route also takes [`OPENAI_SAMPLING`]), and the field holding the generation
/// limit (required, at most the per-slot context).
pub struct EngineRoute {
    pub path: &'static str,
    pub fields: &'static [&'static str],
    pub openai_sampling: bool,
    pub limit: Option<&'static str>,
}

pub const OPENAI_SAMPLING: &[&str] = &[
    "max_tokens",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stop",
];

pub const ENGINE_ROUTES: &[EngineRoute] = &[
    EngineRoute {
        path: "completion",
        openai_sampling: false,
        fields: &[
            "prompt",
            "n_predict",
            "stream",
            "cache_prompt",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "stop",
            "id_slot",
        ],
        limit: Some("n_predict"),
    },
    EngineRoute {
        path: "v1/chat/completions",
        openai_sampling: true,
        fields: &[
            "messages",
            "response_format",
            "tools",
            "tool_choice",
            "id_slot",
        ],
        limit: Some("max_tokens"),
    },
    EngineRoute {
        path: "v1/completions",
        openai_sampling: true,
        fields: &["prompt", "id_slot"],
        limit: Some("max_tokens"),
    },
    EngineRoute {
        path: "v1/embeddings",
        openai_sampling: false,
        fields: &["input", "encoding_format"],
        limit: None,
    },
    EngineRoute {
        path: "tokenize",
        openai_sampling: false,
        fields: &["content", "add_special"],
        limit: None,
    },
];

impl EngineRoute {
    /// The route `path` (without leading or trailing slashes) names, if the proxy passes it.
    pub fn find(path: &str) -> Option<&'static EngineRoute> {
        ENGINE_ROUTES.iter().find(|r| r.path == path)
    }

    /// Whether a body field named `key` passes on this route.
    pub fn passes(&self, key: &str) -> bool {
        self.fields.contains(&key) || (self.openai_sampling && OPENAI_SAMPLING.contains(&key))
    }
}
