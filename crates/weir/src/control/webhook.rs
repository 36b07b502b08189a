//! Delivery of guard events to an operator's webhook: a JSON POST with a timeout and a
//! few retries, on its own task, so a slow or dead webhook never delays a rollback.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::control::store::Event;

/// Per attempt, connect to response headers.
const TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPTS: u32 = 3;
/// Doubles after each failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// A webhook sender; cheap to clone.
#[derive(Clone)]
pub(crate) struct Webhook {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").finish_non_exhaustive()
    }
}

impl Default for Webhook {
    fn default() -> Self {
        Self::new()
    }
}

impl Webhook {
    pub(crate) fn new() -> Webhook {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        Webhook {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Send `event` to `url` in the background; failures are logged, never returned.
    pub(crate) fn post(&self, url: Uri, event: Event) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("webhook {url}: no runtime to send event #{} from", event.id);
            return;
        };
        let body = match serde_json::to_vec(&event) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!("webhook {url}: cannot encode event #{}: {e}", event.id);
                return;
            }
        };
        let client = self.client.clone();
        runtime.spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            for attempt in 1..=ATTEMPTS {
                let req = Request::post(url.clone())
                    .header("content-type", "application/json")
                    .header("user-agent", concat!("weir/", env!("CARGO_PKG_VERSION")))
                    .body(Full::new(body.clone()));
                let Ok(req) = req else { return };
                match tokio::time::timeout(TIMEOUT, client.request(req)).await {
                    Ok(Ok(resp)) if resp.status().is_success() => return,
                    Ok(Ok(resp)) => tracing::warn!(
                        "webhook {url}: attempt {attempt}/{ATTEMPTS} answered {}",
                        resp.status()
                    ),
                    Ok(Err(e)) => {
                        tracing::warn!("webhook {url}: attempt {attempt}/{ATTEMPTS} failed: {e}")
                    }
                    Err(_) => tracing::warn!(
                        "webhook {url}: attempt {attempt}/{ATTEMPTS} timed out after {TIMEOUT:?}"
                    ),
                }
                if attempt < ATTEMPTS {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
            tracing::error!("webhook {url}: gave up on event #{}", event.id);
        });
    }
}
