//! The one error envelope (DESIGN §3) and the one place that maps a code to an HTTP status.

use serde::{Deserialize, Serialize};

/// Defines `ErrorCode` and `ErrorCode::ALL` from one list, so the list of every code cannot
/// miss one.
macro_rules! error_codes {
    ($( $(#[$doc:meta])* $code:ident, )*) => {
        /// Every error code either daemon can answer with, over HTTP or inside an SSE stream.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum ErrorCode {
            $( $(#[$doc])* $code, )*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$code, )* ];
        }
    };
}

error_codes! {
    InvalidParams,
    Unauthorized,
    /// Authenticated, but not allowed this (an engine route or field the proxy does not pass).
    Forbidden,
    NotFound,
    /// The endpoint exists but not with this HTTP method.
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    /// The request body did not arrive within the server's body-read timeout.
    RequestTimeout,
    /// A replay (`Last-Event-ID`) asked for frames the task's byte-capped log dropped.
    ReplayUnavailable,
    AdmissionReject,
    QueueFullDropLru,
    ModelNotAvailable,
    PoolUnavailable,
    PoolUnready,
    DeadlineUnmet,
    Internal,
    /// In-stream only: the engine died after the first token.
    WorkerReset,
    /// In-stream only: the engine stream stalled.
    DecodeTimeout,
    /// In-stream only: the task was cancelled.
    Cancelled,
    /// The admission journal could not make the admission durable (failed or too slow): the
    /// task was not admitted.
    JournalUnavailable,
}

impl ErrorCode {
    /// HTTP status for this code. In-stream codes map to the status a non-streaming answer
    /// would carry.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidParams => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::ReplayUnavailable => 410,
            ErrorCode::AdmissionReject | ErrorCode::QueueFullDropLru => 429,
            ErrorCode::ModelNotAvailable
            | ErrorCode::PoolUnavailable
            | ErrorCode::PoolUnready
            | ErrorCode::JournalUnavailable => 503,
            ErrorCode::DeadlineUnmet | ErrorCode::DecodeTimeout => 504,
            ErrorCode::Internal => 500,
            ErrorCode::WorkerReset => 502,
            ErrorCode::Cancelled => 499,
        }
    }

    /// Whether a client may retry the same request later.
    pub fn retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::AdmissionReject
                | ErrorCode::QueueFullDropLru
                | ErrorCode::ModelNotAvailable
                | ErrorCode::PoolUnavailable
                | ErrorCode::PoolUnready
                | ErrorCode::WorkerReset
                | ErrorCode::DecodeTimeout
                | ErrorCode::Internal
                | ErrorCode::JournalUnavailable
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidParams => "INVALID_PARAMS",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::RequestTimeout => "REQUEST_TIMEOUT",
            ErrorCode::ReplayUnavailable => "REPLAY_UNAVAILABLE",
            ErrorCode::AdmissionReject => "ADMISSION_REJECT",
            ErrorCode::QueueFullDropLru => "QUEUE_FULL_DROP_LRU",
            ErrorCode::ModelNotAvailable => "MODEL_NOT_AVAILABLE",
            ErrorCode::PoolUnavailable => "POOL_UNAVAILABLE",
            ErrorCode::PoolUnready => "POOL_UNREADY",
            ErrorCode::DeadlineUnmet => "DEADLINE_UNMET",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::WorkerReset => "WORKER_RESET",
            ErrorCode::DecodeTimeout => "DECODE_TIMEOUT",
            ErrorCode::Cancelled => "CANCELLED",
            ErrorCode::JournalUnavailable => "JOURNAL_UNAVAILABLE",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{code, message, retriable, retry_after_ms?, policy_label?, engine?}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub code: ErrorCode,
    pub message: String,
    pub retriable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

impl ErrorEnvelope {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retriable: code.retriable(),
            retry_after_ms: None,
            policy_label: None,
            engine: None,
        }
    }

    pub fn with_retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    pub fn with_policy_label(mut self, label: impl Into<String>) -> Self {
        self.policy_label = Some(label.into());
        self
    }

    pub fn with_engine(mut self, engine: impl Into<String>) -> Self {
        self.engine = Some(engine.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // covers: ORCH-2103
    #[test]
    fn envelope_serialises_codes_in_screaming_snake_case_and_omits_empty_options() {
        let json = serde_json::to_value(ErrorEnvelope::new(ErrorCode::QueueFullDropLru, "full"))
            .unwrap_or_default();
        assert_eq!(json["code"], "QUEUE_FULL_DROP_LRU");
        assert_eq!(json["retriable"], true);
        assert!(json.get("retry_after_ms").is_none());
    }

    #[test]
    fn as_str_matches_serde_name_for_every_code() {
        for &code in ErrorCode::ALL {
            let json = serde_json::to_value(code).unwrap_or_default();
            assert_eq!(json, code.as_str());
            let back: ErrorCode = serde_json::from_value(json).unwrap_or(ErrorCode::Internal);
            assert_eq!(back, code, "{code} does not read back");
        }
        assert!(ErrorCode::ALL.contains(&ErrorCode::JournalUnavailable));
    }
}
