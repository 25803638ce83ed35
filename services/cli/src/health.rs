//! `marquee health`: `grpc.health.v1.Health/Check` for the server and any named services, plus
//! the Open Inference Protocol's `ServerReady` and `ModelReady` when models are named.

use std::fmt::Write as _;

use marquee_proto::inference::{ModelReadyRequest, ServerReadyRequest};
use serde_json::{Value, json};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::cli::HealthArgs;
use crate::connection::Connection;
use crate::output::Outcome;

/// The health status reported for a name the server does not know (the proto's own term).
const SERVICE_UNKNOWN: &str = "SERVICE_UNKNOWN";

/// Everything `health` found out.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `grpc.health.v1` status of the server (service `""`).
    pub server: String,
    /// `grpc.health.v1` status of each `--service`, in the order given.
    pub services: Vec<(String, String)>,
    /// OIP `ServerReady`; checked only when models are named.
    pub server_ready: Option<bool>,
    /// OIP `ModelReady` of each `--model`, in the order given.
    pub models: Vec<(String, bool)>,
}

impl Report {
    /// Serving only if every check passed.
    pub fn serving(&self) -> bool {
        let is_serving = |s: &str| s == ServingStatus::Serving.as_str_name();
        is_serving(&self.server)
            && self.services.iter().all(|(_, s)| is_serving(s))
            && self.server_ready != Some(false)
            && self.models.iter().all(|(_, ready)| *ready)
    }
}

pub async fn run(conn: &Connection, args: HealthArgs, json: bool) -> anyhow::Result<Outcome> {
    let server = check(conn, "").await?;
    let mut services = Vec::with_capacity(args.services.len());
    for name in args.services {
        let status = check(conn, &name).await?;
        services.push((name, status));
    }
    let mut server_ready = None;
    let mut models = Vec::with_capacity(args.models.len());
    if !args.models.is_empty() {
        let mut oip = conn.inference();
        let request = conn.request(ServerReadyRequest {});
        server_ready = Some(conn.call(oip.server_ready(request)).await?.ready);
        for name in args.models {
            let request = ModelReadyRequest {
                name: name.clone(),
                version: String::new(),
            };
            let ready = match conn.call(oip.model_ready(conn.request(request))).await {
                Ok(r) => r.ready,
                // A model the server does not have is simply not ready.
                Err(status) if status.code() == Code::NotFound => false,
                Err(status) => return Err(status.into()),
            };
            models.push((name, ready));
        }
    }
    let report = Report {
        server,
        services,
        server_ready,
        models,
    };
    let serving = report.serving();
    Ok(if json {
        Outcome::json(&to_json(&report), serving)
    } else {
        Outcome {
            stdout: to_text(&report),
            success: serving,
        }
    })
}

/// One `Health/Check`; a name the server does not know reads as `SERVICE_UNKNOWN`, not an
/// error, so `health` can still print the whole picture.
async fn check(conn: &Connection, service: &str) -> Result<String, tonic::Status> {
    let request = conn.request(HealthCheckRequest {
        service: service.to_owned(),
    });
    match conn.call(conn.health().check(request)).await {
        Ok(response) => {
            let status = ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown);
            Ok(status.as_str_name().to_owned())
        }
        Err(status) if status.code() == Code::NotFound => Ok(SERVICE_UNKNOWN.to_owned()),
        Err(status) => Err(status),
    }
}

fn overall(report: &Report) -> &'static str {
    if report.serving() {
        ServingStatus::Serving.as_str_name()
    } else {
        ServingStatus::NotServing.as_str_name()
    }
}

/// `SERVING` or `NOT_SERVING`, then one line per check.
pub fn to_text(report: &Report) -> String {
    let ready = |r: bool| if r { "READY" } else { "NOT_READY" };
    let mut rows = vec![("server".to_owned(), report.server.clone())];
    for (name, status) in &report.services {
        rows.push((format!("service {name}"), status.clone()));
    }
    if let Some(r) = report.server_ready {
        rows.push(("server ready".to_owned(), ready(r).to_owned()));
    }
    for (name, r) in &report.models {
        rows.push((format!("model {name}"), ready(*r).to_owned()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("{}\n", overall(report));
    for (check, result) in rows {
        writeln!(out, "  {check:<width$}  {result}")
            .expect("writing to a String cannot fail; this is a bug");
    }
    out
}

pub fn to_json(report: &Report) -> Value {
    let mut value = json!({
        "status": overall(report),
        "server": report.server,
        "services": report
            .services
            .iter()
            .map(|(name, status)| json!({ "name": name, "status": status }))
            .collect::<Vec<_>>(),
    });
    if let Some(ready) = report.server_ready {
        value["server_ready"] = json!(ready);
        value["models"] = report
            .models
            .iter()
            .map(|(name, ready)| json!({ "name": name, "ready": ready }))
            .collect();
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Report {
        Report {
            server: "SERVING".into(),
            services: vec![("fashion_cnn".into(), "SERVING".into())],
            server_ready: Some(true),
            models: vec![("efficientnet_lite0".into(), true)],
        }
    }

    #[test]
    fn serving_needs_every_check_to_pass() {
        assert!(healthy().serving());
        let mut r = healthy();
        r.services[0].1 = SERVICE_UNKNOWN.into();
        assert!(!r.serving());
        let mut r = healthy();
        r.models[0].1 = false;
        assert!(!r.serving());
        let mut r = healthy();
        r.server_ready = Some(false);
        assert!(!r.serving());
        let mut r = healthy();
        r.server = "NOT_SERVING".into();
        assert!(!r.serving());
    }

    #[test]
    fn text_leads_with_the_verdict() {
        assert_eq!(
            to_text(&healthy()),
            "SERVING\n  server                    SERVING\n  service fashion_cnn       SERVING\n  \
             server ready              READY\n  model efficientnet_lite0  READY\n"
        );
        let bare = Report {
            server: "NOT_SERVING".into(),
            services: vec![],
            server_ready: None,
            models: vec![],
        };
        assert_eq!(to_text(&bare), "NOT_SERVING\n  server  NOT_SERVING\n");
    }

    #[test]
    fn json_has_oip_fields_only_when_models_were_checked() {
        let v = to_json(&healthy());
        assert_eq!(v["status"], "SERVING");
        assert_eq!(v["services"][0]["name"], "fashion_cnn");
        assert_eq!(v["server_ready"], true);
        assert_eq!(v["models"][0]["ready"], true);
        let bare = Report {
            server: "SERVING".into(),
            services: vec![],
            server_ready: None,
            models: vec![],
        };
        let v = to_json(&bare);
        assert_eq!(v["status"], "SERVING");
        assert!(v.get("server_ready").is_none() && v.get("models").is_none());
    }
}
