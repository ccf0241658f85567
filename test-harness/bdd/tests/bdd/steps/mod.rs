//! Step definitions, one module per area. Each Then asserts what its text says.

mod answers;
mod cloud;
mod handoff;
mod metrics;
mod openai;
mod pools;
mod setup;
mod streams;
mod tasks;

use std::str::FromStr;

use crate::daemons;
use crate::world::Bdd;

/// Who sends a request, as a step says it.
#[derive(Debug, Clone, Copy, cucumber::Parameter)]
#[param(
    name = "caller",
    regex = "without a token|with a wrong token|with the client key|with the other client key|with the admin token|with the node token"
)]
pub enum Caller {
    Nobody,
    Wrong,
    Client,
    OtherClient,
    Admin,
    Node,
}

impl FromStr for Caller {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "without a token" => Caller::Nobody,
            "with a wrong token" => Caller::Wrong,
            "with the client key" => Caller::Client,
            "with the other client key" => Caller::OtherClient,
            "with the admin token" => Caller::Admin,
            "with the node token" => Caller::Node,
            other => return Err(format!("unknown caller {other:?}")),
        })
    }
}

/// Presented by "a request with a wrong token": valid in no role.
pub const WRONG_TOKEN: &str = "bdd-wrong-token-000000000000";

impl Caller {
    /// The secret this caller presents in this scenario's stack (none without a token).
    pub fn token(self, w: &Bdd) -> Option<String> {
        match self {
            Caller::Nobody => None,
            Caller::Wrong => Some(WRONG_TOKEN.into()),
            Caller::Client => Some(w.client_token.clone()),
            Caller::OtherClient => Some(daemons::OTHER_CLIENT_KEY.into()),
            Caller::Admin => Some(w.admin_token.clone()),
            Caller::Node => Some(daemons::NODE_TOKEN.into()),
        }
    }

    pub fn client(self, w: &Bdd) -> reqwest::Client {
        match self.token(w) {
            Some(t) => w.http(&t),
            None => reqwest::Client::new(),
        }
    }
}

/// A task body of `max_tokens` for model `tiny`.
pub fn task_body(prompt: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model_ref": "tiny", "prompt": prompt, "max_tokens": max_tokens})
}
