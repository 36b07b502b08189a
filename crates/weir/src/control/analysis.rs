//! External analysis, as Argo's AnalysisTemplate and Flagger's metric checks and
//! webhooks do it: a Prometheus instant query judged against a threshold, and HTTP
//! webhooks called around a rollout.
//!
//! Two halves. The pure half turns an answer (or its absence, or an error) into a
//! [`Outcome`] and keeps the per-template [`Tally`] the persisted rollout carries, so
//! that a restart in the middle of a step keeps its count. The I/O half makes the calls,
//! each bounded by a timeout; the rollout driver runs it on its own tasks and feeds the
//! results to the controller as evidence, the way the guard's verdicts are fed.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::config::{AnalysisTemplate, HookConfig, HookKind, NoData};

/// Largest Prometheus answer or webhook body read: an instant query judged here is one
/// number, and a webhook's body is only shown in an event.
const MAX_BODY: usize = 1024 * 1024;
/// Bytes of a webhook's or Prometheus' error body kept in an event.
const DETAIL_BYTES: usize = 200;

/// Text from a Prometheus or webhook answer made fit for an event or a log line: at most
/// [`DETAIL_BYTES`] bytes (cut at a char boundary, `…` marking the cut), with control
/// characters escaped. The answer is up to [`MAX_BODY`] bytes chosen by whoever runs
/// that server: kept whole it would bloat every event, and a raw newline or ESC in it
/// could forge a log line or drive the reader's terminal.
fn clip(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let piece: String = if c.is_control() {
            c.escape_debug().collect()
        } else {
            c.into()
        };
        // Bound the escaped text, not the raw one: escaping can grow a byte tenfold.
        if out.len() + piece.len() > DETAIL_BYTES {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// What one measurement (or webhook call) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    /// No sample and `no_data = "inconclusive"`: measured again, not counted.
    Inconclusive,
    /// Prometheus was down, slow, or answered something unusable: counted against the
    /// failure limit like a failure (a check that cannot run is not a pass).
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Inconclusive => "inconclusive",
            Outcome::Error => "error",
        }
    }
}

/// One measurement of a template, as the journal records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub template: String,
    /// The query's value; `None` for no data or an error.
    pub value: Option<f64>,
    /// The threshold it was judged against, e.g. `>= 0.99`.
    pub threshold: String,
    pub outcome: Outcome,
    /// Why, in words (the error, "no data", a failing load-test webhook).
    pub detail: String,
    pub duration_ms: u64,
    /// The `rollout` webhooks called with this measurement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<HookCall>,
}

/// One webhook call, as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookCall {
    pub name: String,
    pub kind: String,
    /// The HTTP status; `None` when there was no answer (refused, timed out).
    pub status: Option<u16>,
    pub ok: bool,
    pub detail: String,
    pub duration_ms: u64,
}

/// A template's measurements so far in a step (or, for a background analysis, in the
/// whole rollout). Persisted with the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub template: String,
    /// Runs for the whole rollout rather than one step.
    #[serde(default)]
    pub background: bool,
    /// The step it measures (none for a background analysis). Kept after the step, so
    /// status shows the latest results until the next rollout.
    #[serde(default)]
    pub step: Option<usize>,
    /// Passes needed (steps only) and failures tolerated, fixed at the first
    /// measurement.
    pub count: u32,
    pub failure_limit: u32,
    #[serde(default)]
    pub passed: u32,
    /// Failed measurements and errors.
    #[serde(default)]
    pub failed: u32,
    #[serde(default)]
    pub inconclusive: u32,
    /// When the last measurement was made, RFC 3339 (schedules the next one).
    #[serde(default)]
    pub last: Option<String>,
    /// The last measurement's value, outcome and reason, for status and the dashboard.
    #[serde(default)]
    pub last_value: Option<f64>,
    #[serde(default)]
    pub last_outcome: Option<Outcome>,
    #[serde(default)]
    pub last_detail: Option<String>,
}

/// Where a tally stands after a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Running,
    /// A step's analysis has its `count` of passes.
    Passed,
    /// More failures (or errors) than `failure_limit`.
    Failed,
}

impl Tally {
    pub fn new(t: &AnalysisTemplate, background: bool) -> Tally {
        Tally {
            template: t.name.clone(),
            background,
            step: None,
            count: t.count,
            failure_limit: t.failure_limit,
            passed: 0,
            failed: 0,
            inconclusive: 0,
            last: None,
            last_value: None,
            last_outcome: None,
            last_detail: None,
        }
    }

    /// Count one measurement made at `at`.
    pub fn record(&mut self, outcome: Outcome, at: SystemTime) -> Standing {
        match outcome {
            Outcome::Pass => self.passed += 1,
            Outcome::Fail | Outcome::Error => self.failed += 1,
            Outcome::Inconclusive => self.inconclusive += 1,
        }
        self.last = Some(crate::model::timestamp(at));
        self.last_outcome = Some(outcome);
        self.standing()
    }

    pub fn standing(&self) -> Standing {
        if self.failed > self.failure_limit {
            Standing::Failed
        } else if !self.background && self.passed >= self.count {
            Standing::Passed
        } else {
            Standing::Running
        }
    }

    /// When the last measurement was made.
    pub fn last_at(&self) -> Option<SystemTime> {
        self.last
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
    }

    /// The tally in words, for status.
    pub fn describe(&self) -> String {
        let kind = if self.background { "background " } else { "" };
        let passes = if self.background {
            format!("{} passed", self.passed)
        } else {
            format!("{}/{} passed", self.passed, self.count)
        };
        format!(
            "{kind}analysis `{}`: {passes}, {}/{} failures tolerated",
            self.template, self.failed, self.failure_limit
        )
    }
}

/// Judge a query's answer: `Ok(Some(v))` a value, `Ok(None)` no data, `Err` an error.
pub fn judge(t: &AnalysisTemplate, answer: &Result<Option<f64>, String>) -> (Outcome, String) {
    match answer {
        Ok(Some(v)) if t.success.holds(*v) => (Outcome::Pass, format!("{v} {}", t.success)),
        Ok(Some(v)) => (Outcome::Fail, format!("{v} does not satisfy {}", t.success)),
        Ok(None) => match t.no_data {
            NoData::Pass => (Outcome::Pass, "no data (counted as a pass)".into()),
            NoData::Fail => (Outcome::Fail, "no data (counted as a failure)".into()),
            NoData::Inconclusive => (Outcome::Inconclusive, "no data".into()),
        },
        Err(e) => (Outcome::Error, e.clone()),
    }
}

/// The query with its placeholders filled in.
pub fn render(query: &str, service: &str, candidate: &str, stable: &str) -> String {
    query
        .replace("{{service}}", service)
        .replace("{{candidate}}", candidate)
        .replace("{{stable}}", stable)
}

/// Read an instant query's answer (`/api/v1/query`): one sample, or none. More than one
/// series is an error: the query must aggregate to one number, or the check would
/// judge an arbitrary series.
pub fn parse_answer(body: &[u8]) -> Result<Option<f64>, String> {
    #[derive(Deserialize)]
    struct Answer {
        status: String,
        #[serde(default)]
        data: Option<Data>,
        #[serde(default)]
        error: Option<String>,
    }
    #[derive(Deserialize)]
    struct Data {
        #[serde(rename = "resultType")]
        result_type: String,
        result: serde_json::Value,
    }
    let a: Answer = serde_json::from_slice(body)
        .map_err(|e| format!("Prometheus answered something that is not its API's JSON: {e}"))?;
    if a.status != "success" {
        return Err(format!(
            "Prometheus refused the query: {}",
            clip(&a.error.unwrap_or(a.status))
        ));
    }
    let data = a.data.ok_or("Prometheus' answer has no data")?;
    let sample = match data.result_type.as_str() {
        "scalar" => Some(data.result),
        "vector" => {
            // A `result` that is not a list, or a series without `value` (a native
            // histogram's sample is `histogram`), is an answer this check cannot read:
            // an error, never "no data", which `no_data = "pass"` would count as a pass.
            let list = data
                .result
                .as_array()
                .ok_or("Prometheus' vector `result` is not a list")?;
            match list.len() {
                0 => None,
                1 => Some(
                    list[0]
                        .get("value")
                        .cloned()
                        .ok_or("the series has no `value` (a histogram?); query one number")?,
                ),
                n => {
                    return Err(format!(
                        "the query returned {n} series; aggregate it to one (e.g. sum(...))"
                    ));
                }
            }
        }
        other => {
            return Err(format!(
                "the query returned a {}; use an instant vector or scalar",
                clip(other)
            ));
        }
    };
    let Some(sample) = sample else {
        return Ok(None);
    };
    let text = sample
        .get(1)
        .and_then(|v| v.as_str())
        .ok_or("a sample without a value")?;
    let v: f64 = text
        .parse()
        .map_err(|_| format!("`{}` is not a number", clip(text)))?;
    // A ratio over no traffic is NaN: that is an absence of data, not a value (as the
    // README documents, it follows `no_data`).
    if v.is_nan() {
        return Ok(None);
    }
    // An infinity (a ratio over a zero denominator) would be judged as a number, and
    // +Inf passes any `>=` threshold: an error instead, never a pass.
    if v.is_infinite() {
        return Err(format!("`{}` is not a finite number", clip(text)));
    }
    Ok(Some(v))
}

/// What a webhook's answer says in its event: the status and the start of its body,
/// clipped and escaped (see [`clip`]).
fn hook_detail(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(DETAIL_BYTES)]);
    let text = text.trim();
    if text.is_empty() {
        format!("answered {status}")
    } else {
        format!("answered {status}: {}", clip(text))
    }
}

/// The HTTP client analysis and webhooks share; cheap to clone.
#[derive(Clone)]
pub(crate) struct Caller {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller").finish_non_exhaustive()
    }
}

impl Default for Caller {
    fn default() -> Self {
        Caller::new()
    }
}

impl Caller {
    pub(crate) fn new() -> Caller {
        Caller {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    /// One request with a deadline over the whole exchange (head and body): status and
    /// up to [`MAX_BODY`] bytes of body.
    async fn exchange(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), String> {
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let mut msg = e.to_string();
                if let Some(src) = std::error::Error::source(&e) {
                    msg = format!("{msg}: {src}");
                }
                msg
            })?;
            let status = resp.status().as_u16();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| format!("no answer within {}", humantime::format_duration(timeout)))?
    }

    /// Run a template's query once.
    pub(crate) async fn measure(
        &self,
        t: &AnalysisTemplate,
        service: &str,
        candidate: &str,
        stable: &str,
    ) -> Measurement {
        let started = Instant::now();
        let query = render(&t.query, service, candidate, stable);
        let encoded: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", &query)
            .finish();
        let answer = match format!("{}/api/v1/query?{encoded}", t.prometheus).parse::<Uri>() {
            Err(e) => Err(format!("bad query URL: {e}")),
            Ok(uri) => match Request::get(uri)
                .header("user-agent", concat!("weir/", env!("CARGO_PKG_VERSION")))
                .body(Full::new(Bytes::new()))
            {
                Err(e) => Err(e.to_string()),
                Ok(req) => match self.exchange(req, t.timeout).await {
                    Err(e) => Err(format!("Prometheus at {}: {e}", t.prometheus)),
                    // Prometheus answers 400/422 with its JSON error: show that.
                    Ok((_, body)) => parse_answer(&body),
                },
            },
        };
        let (outcome, detail) = judge(t, &answer);
        Measurement {
            template: t.name.clone(),
            value: answer.ok().flatten(),
            threshold: t.success.to_string(),
            outcome,
            detail,
            duration_ms: started.elapsed().as_millis() as u64,
            webhooks: Vec::new(),
        }
    }

    /// Call one webhook with `payload` (the rollout in JSON) and its metadata. A 2xx
    /// answer is a pass; anything else, or no answer in time, is not.
    pub(crate) async fn call(&self, hook: &HookConfig, payload: &serde_json::Value) -> HookCall {
        let started = Instant::now();
        let mut body = payload.clone();
        if let Some(obj) = body.as_object_mut() {
            obj.insert("name".into(), hook.name.clone().into());
            obj.insert("kind".into(), hook.kind.as_str().into());
            obj.insert(
                "metadata".into(),
                serde_json::to_value(&hook.metadata).unwrap_or_default(),
            );
        }
        let result = match hook.url.parse::<Uri>() {
            Err(e) => Err(format!("bad URL: {e}")),
            Ok(uri) => match Request::post(uri)
                .header("content-type", "application/json")
                .header("user-agent", concat!("weir/", env!("CARGO_PKG_VERSION")))
                .body(Full::new(Bytes::from(body.to_string())))
            {
                Err(e) => Err(e.to_string()),
                Ok(req) => self.exchange(req, hook.timeout).await,
            },
        };
        let (status, ok, detail) = match result {
            Ok((status, body)) => {
                let ok = (200..300).contains(&status);
                (Some(status), ok, hook_detail(status, &body))
            }
            Err(e) => (None, false, e),
        };
        HookCall {
            name: hook.name.clone(),
            kind: hook.kind.as_str().into(),
            status,
            ok,
            detail,
            duration_ms: started.elapsed().as_millis() as u64,
        }
    }

    /// Call every webhook of `kind`, one after the other (a load test should not run
    /// alongside the acceptance test it follows).
    pub(crate) async fn call_all<'a>(
        &self,
        hooks: impl Iterator<Item = &'a HookConfig>,
        payload: &serde_json::Value,
    ) -> Vec<HookCall> {
        let mut calls = Vec::new();
        for h in hooks {
            calls.push(self.call(h, payload).await);
        }
        calls
    }
}

/// The hooks of `kind` in `hooks`.
pub(crate) fn of_kind(hooks: &[HookConfig], kind: HookKind) -> impl Iterator<Item = &HookConfig> {
    hooks.iter().filter(move |h| h.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Comparison, Threshold};

    fn template(no_data: NoData) -> AnalysisTemplate {
        AnalysisTemplate {
            name: "ok-rate".into(),
            prometheus: "http://127.0.0.1:9".into(),
            query: "x".into(),
            success: Threshold {
                op: Comparison::Ge,
                value: 0.99,
            },
            interval: Duration::from_secs(1),
            count: 3,
            failure_limit: 1,
            no_data,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn answers_are_judged_by_threshold_and_no_data_policy() {
        let t = template(NoData::Inconclusive);
        assert_eq!(judge(&t, &Ok(Some(0.995))).0, Outcome::Pass);
        assert_eq!(judge(&t, &Ok(Some(0.5))).0, Outcome::Fail);
        assert_eq!(judge(&t, &Ok(None)).0, Outcome::Inconclusive);
        assert_eq!(judge(&template(NoData::Fail), &Ok(None)).0, Outcome::Fail);
        assert_eq!(judge(&template(NoData::Pass), &Ok(None)).0, Outcome::Pass);
        let (o, why) = judge(&t, &Err("connection refused".into()));
        assert_eq!((o, why.as_str()), (Outcome::Error, "connection refused"));
    }

    #[test]
    fn tally_passes_at_count_and_fails_past_the_limit_counting_errors() {
        let t = template(NoData::Inconclusive);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut tally = Tally::new(&t, false);
        assert_eq!(tally.record(Outcome::Pass, at), Standing::Running);
        assert_eq!(tally.record(Outcome::Inconclusive, at), Standing::Running);
        assert_eq!(tally.record(Outcome::Error, at), Standing::Running);
        assert_eq!(tally.record(Outcome::Pass, at), Standing::Running);
        assert_eq!(tally.last_at(), Some(at));
        assert_eq!(tally.record(Outcome::Pass, at), Standing::Passed);
        let mut failing = Tally::new(&t, false);
        failing.record(Outcome::Fail, at);
        assert_eq!(failing.record(Outcome::Error, at), Standing::Failed);
        // A background analysis never "passes": it runs until the rollout ends.
        let mut bg = Tally::new(&t, true);
        for _ in 0..10 {
            assert_eq!(bg.record(Outcome::Pass, at), Standing::Running);
        }
    }

    #[test]
    fn prometheus_answers_are_read() {
        let one = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.1,"0.995"]}]}}"#;
        assert_eq!(parse_answer(one), Ok(Some(0.995)));
        let none = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_answer(none), Ok(None));
        let nan = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#;
        assert_eq!(parse_answer(nan), Ok(None));
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}"#;
        assert_eq!(parse_answer(scalar), Ok(Some(2.0)));
        let two = br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#;
        assert!(parse_answer(two).unwrap_err().contains("2 series"));
        let bad = br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(parse_answer(bad).unwrap_err().contains("parse error"));
        assert!(parse_answer(b"<html>").is_err());
    }

    #[test]
    fn unreadable_answers_are_errors_not_data() {
        let answer = |v: &str| {
            format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1,"{v}"]}}]}}}}"#
            )
        };
        for inf in ["+Inf", "-Inf", "Inf", "inf"] {
            let got = parse_answer(answer(inf).as_bytes());
            assert!(got.is_err(), "{inf}: {got:?}");
            // And so it is judged an error, even where no data would pass.
            assert_eq!(judge(&template(NoData::Pass), &got).0, Outcome::Error);
        }
        // A native histogram's series has `histogram`, not `value`.
        let hist = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"histogram":[1,{"count":"3"}]}]}}"#;
        assert!(parse_answer(hist).unwrap_err().contains("no `value`"));
        let not_list = br#"{"status":"success","data":{"resultType":"vector","result":{"a":1}}}"#;
        assert!(parse_answer(not_list).unwrap_err().contains("not a list"));
        let null = br#"{"status":"success","data":{"resultType":"vector","result":null}}"#;
        assert!(parse_answer(null).is_err());
    }

    #[test]
    fn answer_text_in_details_is_clipped_and_escaped() {
        let long = "x".repeat(100_000);
        let forged = "bad\\n2026-01-01 INFO forged line\\u001b[2J";
        for text in [long.as_str(), forged] {
            let refused = format!(r#"{{"status":"error","error":"{text}"}}"#);
            let nan = format!(
                r#"{{"status":"success","data":{{"resultType":"scalar","result":[1,"{text}"]}}}}"#
            );
            for body in [refused, nan] {
                let e = parse_answer(body.as_bytes()).unwrap_err();
                assert!(e.len() < DETAIL_BYTES + 100, "{} bytes", e.len());
                assert!(!e.chars().any(char::is_control), "{e:?}");
            }
        }
        let e = parse_answer(format!(r#"{{"status":"error","error":"{forged}"}}"#).as_bytes())
            .unwrap_err();
        assert!(e.contains(r"bad\n2026") && e.contains(r"\u{1b}[2J"), "{e}");

        let hook = hook_detail(500, format!("oops\n{long}").as_bytes());
        assert!(hook.starts_with(r"answered 500: oops\nxx") && hook.ends_with('…'));
        assert!(hook.len() < DETAIL_BYTES + 100);
        assert_eq!(hook_detail(204, b" \n"), "answered 204");
        // The cut falls at a char boundary: é is two bytes.
        let wide = clip(&"é".repeat(DETAIL_BYTES));
        assert_eq!(wide, format!("{}…", "é".repeat(DETAIL_BYTES / 2)));
    }

    #[test]
    fn placeholders_are_filled() {
        assert_eq!(
            render(
                r#"x{service="{{service}}",pool="{{candidate}}",base="{{stable}}"}"#,
                "shop",
                "canary",
                "stable"
            ),
            r#"x{service="shop",pool="canary",base="stable"}"#
        );
    }
}
