//! Gateway settings: listeners, auth, tenants, backends and routes. Loaded like every Marquee
//! service (defaults → `--config` file → `MARQUEE__` env) and validated at start.

use std::collections::BTreeMap;
use std::path::PathBuf;

use marquee_core::config::{ServerSettings, TelemetrySettings, Validate};
use serde::{Deserialize, Serialize};

/// Scopes a principal can hold.
pub const SCOPES: &[&str] = &[
    "vision:infer",
    "language:generate",
    "recommendation:read",
    "recommendation:write",
    "admin",
];

/// Largest `auth.jwt.leeway_s`. Leeway is for clock skew between the identity provider and
/// the gateway (seconds); minutes of it would keep expired tokens alive.
pub const MAX_JWT_LEEWAY_S: u64 = 300;

/// All gateway settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub telemetry: TelemetrySettings,
    pub auth: AuthSettings,
    /// Tenants by name. Only configured tenants exist: metrics labels stay bounded.
    pub tenants: BTreeMap<String, Tenant>,
    /// Backend services by name.
    pub backends: BTreeMap<String, Backend>,
    /// Per-API routing and limits.
    pub routes: Routes,
}

impl Default for Settings {
    fn default() -> Self {
        let server = ServerSettings {
            grpc_addr: "127.0.0.1:8000".parse().expect("literal address"),
            admin_addr: "127.0.0.1:9000".parse().expect("literal address"),
            ..ServerSettings::default()
        };
        let mut backends = BTreeMap::new();
        backends.insert(
            "vision".to_string(),
            Backend {
                kind: BackendKind::Vision,
                endpoints: vec!["127.0.0.1:8001".into()],
                ..Backend::default()
            },
        );
        Self {
            server,
            telemetry: TelemetrySettings::default(),
            auth: AuthSettings::default(),
            tenants: BTreeMap::new(),
            backends,
            routes: Routes::default(),
        }
    }
}

/// Credentials the gateway accepts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// API keys inline (hashes only, never the keys themselves).
    pub api_keys: Vec<ApiKey>,
    /// A mounted secrets file (TOML) with more `[[api_keys]]` entries; read at start.
    pub api_keys_file: Option<PathBuf>,
    pub jwt: JwtSettings,
}

/// One API key: its SHA-256 (hex), whose it is and what it may do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// `sha256sum` of the key, lowercase hex.
    pub sha256: String,
    pub tenant: String,
    pub scopes: Vec<String>,
}

/// JWT bearer tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// File holding the HS256 shared secret (raw bytes).
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public keys (RSA for RS256, EC P-256 for ES256).
    pub public_key_files: Vec<PathBuf>,
    /// A JWKS document (RS256/ES256 keys selected by `kid`).
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set: a token without `iss` is then refused.
    pub issuer: Option<String>,
    /// Required `aud`, if set: a token without `aud` is then refused.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, at most [`MAX_JWT_LEEWAY_S`].
    pub leeway_s: u64,
    /// Claim holding the tenant.
    pub tenant_claim: String,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            hs256_secret_file: None,
            public_key_files: Vec::new(),
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway_s: 30,
            tenant_claim: "tenant".into(),
        }
    }
}

/// One tenant's quotas.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tenant {
    /// Sustained calls per second (token bucket refill); 0 = unlimited.
    pub rate_per_s: f64,
    /// Bucket size: calls allowed in a burst.
    pub burst: f64,
    /// Calls in flight at once; 0 = unlimited.
    pub max_in_flight: usize,
    /// Share of saturated backend capacity relative to other tenants.
    pub weight: u32,
    /// Calls that may wait for backend capacity; past it `RESOURCE_EXHAUSTED`.
    pub max_queued: usize,
}

impl Default for Tenant {
    fn default() -> Self {
        Self {
            rate_per_s: 0.0,
            burst: 100.0,
            max_in_flight: 0,
            weight: 1,
            max_queued: 1024,
        }
    }
}

/// Which Marquee API a backend serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Vision,
    Language,
    Recommendation,
}

impl BackendKind {
    /// The scope a call to this kind of backend needs.
    pub fn scope(self) -> &'static str {
        match self {
            Self::Vision => "vision:infer",
            Self::Language => "language:generate",
            Self::Recommendation => "recommendation:read",
        }
    }
}

/// A set of replicas of one service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backend {
    pub kind: BackendKind,
    /// Static `host:port` endpoints.
    pub endpoints: Vec<String>,
    /// A DNS name `host:port` resolving to every replica (a Kubernetes headless Service),
    /// re-resolved every `resolve_interval_ms`.
    pub dns: Option<String>,
    pub resolve_interval_ms: u64,
    /// `grpc.health.v1` check period; a replica that says NOT_SERVING (or fails) is ejected
    /// until it says SERVING again.
    pub health_interval_ms: u64,
    /// Calls in flight per replica; when every replica is full, calls wait in the tenants'
    /// fair queue.
    pub max_in_flight_per_endpoint: usize,
    /// How often to refresh the model → backend table from the replicas' repository index.
    pub models_refresh_ms: u64,
    /// Call the replicas over TLS (mutual TLS with `cert_file` + `key_file`).
    pub tls: Option<ClientTls>,
    /// A secret the gateway sends beside the caller's tenant (`x-marquee-tenant-token`), so a
    /// backend configured with the same file accepts the tenant only from the gateway.
    pub tenant_token_file: Option<PathBuf>,
}

/// TLS to a backend. Files are PEM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// CA that signed the replicas' certificates.
    pub ca_file: PathBuf,
    /// Name the replicas' certificates are checked against (defaults to the endpoint host).
    #[serde(default)]
    pub domain: Option<String>,
    /// Client certificate for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl Default for Backend {
    fn default() -> Self {
        Self {
            kind: BackendKind::Vision,
            endpoints: Vec::new(),
            dns: None,
            resolve_interval_ms: 5_000,
            health_interval_ms: 1_000,
            // Enough to keep a backend's lanes fed; beyond it the backend only queues.
            max_in_flight_per_endpoint: 64,
            models_refresh_ms: 5_000,
            tls: None,
            tenant_token_file: None,
        }
    }
}

/// Per-API settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Routes {
    pub vision: Route,
    pub inference: Route,
    /// `marquee.language.v1.TextGeneration`; streams hold their fair slot until they end.
    pub language: Route,
    /// `marquee.recommendation.v1.Recommender`.
    pub recommendation: Route,
}

impl Default for Routes {
    fn default() -> Self {
        Self {
            vision: Route::default(),
            inference: Route {
                // Merged `ModelInfer` rows must fit the backend model's `max_batch_size`; 16 fits
                // the models built here. A merge the backend refuses is resent call by call.
                max_batch: 16,
                ..Route::default()
            },
            language: Route {
                // A 256-token generation under load takes seconds, not milliseconds.
                default_timeout_ms: 60_000,
                max_timeout_ms: 300_000,
                max_request_bytes: 64 << 10,
                // Cross-client batching of generation happens in the engine (continuous
                // batching), never by merging requests here.
                batching: false,
                ..Route::default()
            },
            recommendation: Route {
                default_timeout_ms: 5_000,
                max_request_bytes: 1 << 20,
                batching: false,
                ..Route::default()
            },
        }
    }
}

/// The APIs the gateway routes, each with its own [`Route`] settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteName {
    /// `marquee.vision.v1.ImageService`.
    Vision,
    /// The Open Inference Protocol, whichever backend serves the model.
    Inference,
    /// `marquee.language.v1.TextGeneration`.
    Language,
    /// `marquee.recommendation.v1.Recommender`.
    Recommendation,
}

impl RouteName {
    pub const ALL: [Self; 4] = [
        Self::Vision,
        Self::Inference,
        Self::Language,
        Self::Recommendation,
    ];

    /// The route of a backend method (`package.Service/Method`), by its service.
    pub fn of_method(method: &str) -> Self {
        let service = method.split('/').next().unwrap_or_default();
        match service {
            "marquee.vision.v1.ImageService" => Self::Vision,
            "marquee.language.v1.TextGeneration" => Self::Language,
            "marquee.recommendation.v1.Recommender" => Self::Recommendation,
            _ => Self::Inference,
        }
    }

    /// The kind of backend the route's calls go to; `None` for the Open Inference Protocol,
    /// which any backend serves (the model decides).
    pub fn kind(self) -> Option<BackendKind> {
        match self {
            Self::Vision => Some(BackendKind::Vision),
            Self::Inference => None,
            Self::Language => Some(BackendKind::Language),
            Self::Recommendation => Some(BackendKind::Recommendation),
        }
    }

    /// The route's key under `routes`, also its metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vision => "vision",
            Self::Inference => "inference",
            Self::Language => "language",
            Self::Recommendation => "recommendation",
        }
    }
}

impl Routes {
    pub fn get(&self, name: RouteName) -> &Route {
        match name {
            RouteName::Vision => &self.vision,
            RouteName::Inference => &self.inference,
            RouteName::Language => &self.language,
            RouteName::Recommendation => &self.recommendation,
        }
    }
}

/// Largest `routes.*.retry_budget_percent`: retries at ten times the call rate (the most the
/// budget implementation supports).
pub const MAX_RETRY_BUDGET_PERCENT: f32 = 1000.0;

/// Limits and batching for one API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Route {
    /// Deadline when the client sends none.
    pub default_timeout_ms: u64,
    /// Cap on client deadlines.
    pub max_timeout_ms: u64,
    /// Largest request message accepted on this route.
    pub max_request_bytes: usize,
    /// Coalesce single-item calls from different clients into one batched backend call.
    pub batching: bool,
    /// Most items in one coalesced backend call.
    pub max_batch: usize,
    /// Longest an item waits for a batch to fill while backend batch calls are in flight.
    /// An item never waits when a batch call slot is free.
    pub max_batch_delay_us: u64,
    /// Coalesced backend calls in flight per model before new items wait to be batched.
    pub max_batches_in_flight: usize,
    /// Retries of this route's calls (on another replica, for UNAVAILABLE) as a share of this
    /// route's recent calls, in 0..=[`MAX_RETRY_BUDGET_PERCENT`]; 0 turns retries off.
    pub retry_budget_percent: f32,
    /// Most batch keys (model, version, call shape) held at once; a new key beyond it evicts
    /// an unused entry, or passes through unbatched while every entry is in use.
    pub max_batch_keys: usize,
    /// A batch key unused this long is dropped.
    pub batch_key_idle_ms: u64,
}

/// Batch keys held per route: far more than the (model, `top_k`) or (model, input layout)
/// pairs honest clients use, small enough that a flood of made-up keys costs a few MB.
pub const DEFAULT_MAX_BATCH_KEYS: usize = 1024;
/// A minute: a key in steady use never expires, one used by a burst goes soon after it.
pub const DEFAULT_BATCH_KEY_IDLE_MS: u64 = 60_000;

impl Default for Route {
    fn default() -> Self {
        Self {
            default_timeout_ms: 30_000,
            max_timeout_ms: 120_000,
            max_request_bytes: 8 << 20,
            batching: true,
            max_batch: 32,
            max_batch_delay_us: 2_000,
            max_batches_in_flight: 2,
            retry_budget_percent: 20.0,
            max_batch_keys: DEFAULT_MAX_BATCH_KEYS,
            batch_key_idle_ms: DEFAULT_BATCH_KEY_IDLE_MS,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, errors: &mut Vec<String>) {
        self.server.validate(errors);
        self.telemetry.validate(errors);
        for (i, key) in self.auth.api_keys.iter().enumerate() {
            validate_key(&format!("auth.api_keys[{i}]"), key, &self.tenants, errors);
        }
        let jwt = &self.auth.jwt;
        if jwt.leeway_s > MAX_JWT_LEEWAY_S {
            errors.push(format!(
                "`auth.jwt.leeway_s` must be at most {MAX_JWT_LEEWAY_S}, got {}",
                jwt.leeway_s
            ));
        }
        for (key, v) in [("issuer", &jwt.issuer), ("audience", &jwt.audience)] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                errors.push(format!(
                    "`auth.jwt.{key}` is empty; leave it unset or name the required value"
                ));
            }
        }
        for (name, b) in &self.backends {
            if b.endpoints.is_empty() && b.dns.is_none() {
                errors.push(format!("`backends.{name}` needs `endpoints` or `dns`"));
            }
            if b.max_in_flight_per_endpoint == 0 {
                errors.push(format!(
                    "`backends.{name}.max_in_flight_per_endpoint` must be at least 1, got 0"
                ));
            }
            if let Some(tls) = &b.tls {
                if tls.cert_file.is_some() != tls.key_file.is_some() {
                    errors.push(format!(
                        "`backends.{name}.tls`: set both `cert_file` and `key_file`, or neither"
                    ));
                }
                let files = [
                    Some(&tls.ca_file),
                    tls.cert_file.as_ref(),
                    tls.key_file.as_ref(),
                ];
                for f in files.into_iter().flatten() {
                    if !f.is_file() {
                        errors.push(format!(
                            "`backends.{name}.tls`: `{}` does not exist",
                            f.display()
                        ));
                    }
                }
            }
            if let Some(Err(e)) = b
                .tenant_token_file
                .as_deref()
                .map(marquee_core::tenant::read_token_file)
            {
                errors.push(format!("`backends.{name}.tenant_token_file`: {e}"));
            }
            if b.health_interval_ms == 0 {
                errors.push(format!(
                    "`backends.{name}.health_interval_ms` must be at least 1, got 0"
                ));
            }
        }
        for (name, t) in &self.tenants {
            if t.weight == 0 {
                errors.push(format!("`tenants.{name}.weight` must be at least 1, got 0"));
            }
            if t.rate_per_s < 0.0 || t.burst < 1.0 {
                errors.push(format!(
                    "`tenants.{name}`: `rate_per_s` must be ≥ 0 and `burst` ≥ 1, got {} and {}",
                    t.rate_per_s, t.burst
                ));
            }
        }
        for name in RouteName::ALL {
            let (r, name) = (self.routes.get(name), name.as_str());
            // Also catches NaN.
            if !(0.0..=MAX_RETRY_BUDGET_PERCENT).contains(&r.retry_budget_percent) {
                errors.push(format!(
                    "`routes.{name}.retry_budget_percent` must be in 0..={MAX_RETRY_BUDGET_PERCENT}, got {}",
                    r.retry_budget_percent
                ));
            }
            if r.max_batch == 0 || r.max_batches_in_flight == 0 {
                errors.push(format!(
                    "`routes.{name}.max_batch` and `max_batches_in_flight` must be at least 1"
                ));
            }
            if r.max_batch_keys == 0 || r.batch_key_idle_ms == 0 {
                errors.push(format!(
                    "`routes.{name}.max_batch_keys` and `batch_key_idle_ms` must be at least 1, got {} and {}",
                    r.max_batch_keys, r.batch_key_idle_ms
                ));
            }
            if r.default_timeout_ms == 0 || r.default_timeout_ms > r.max_timeout_ms {
                errors.push(format!(
                    "`routes.{name}.default_timeout_ms` must be in 1..=`max_timeout_ms` ({}), got {}",
                    r.max_timeout_ms, r.default_timeout_ms
                ));
            }
        }
    }
}

/// Checks one API key entry.
pub fn validate_key(
    at: &str,
    key: &ApiKey,
    tenants: &BTreeMap<String, Tenant>,
    errors: &mut Vec<String>,
) {
    if key.sha256.len() != 64 || hex::decode(&key.sha256).is_err() {
        errors.push(format!(
            "`{at}.sha256` must be 64 hex characters (sha256sum of the key)"
        ));
    }
    if !tenants.contains_key(&key.tenant) {
        errors.push(format!(
            "`{at}.tenant` `{}` is not in `tenants`",
            key.tenant
        ));
    }
    for s in &key.scopes {
        if !SCOPES.contains(&s.as_str()) {
            errors.push(format!(
                "`{at}.scopes`: unknown scope `{s}` (known: {})",
                SCOPES.join(", ")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_replaces_the_default_backend_endpoints() {
        let dir = std::env::temp_dir().join(format!("marquee-gw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("g.toml");
        std::fs::write(
            &file,
            "[tenants.t]\n[[auth.api_keys]]\nsha256 = \"".to_string()
                + &"ab".repeat(32)
                + "\"\ntenant = \"t\"\nscopes = [\"vision:infer\"]\n[backends.vision]\nendpoints = [\"10.0.0.1:1\", \"10.0.0.2:1\"]\n",
        )
        .unwrap();
        let s: Settings = marquee_core::config::load_from(Some(&file), std::iter::empty()).unwrap();
        assert_eq!(s.backends["vision"].endpoints, ["10.0.0.1:1", "10.0.0.2:1"]);
        assert_eq!(
            s.backends["vision"].max_in_flight_per_endpoint, 64,
            "defaults fill the rest"
        );
        assert_eq!(s.auth.api_keys[0].tenant, "t");
    }

    #[test]
    fn keys_for_unknown_tenants_and_scopes_are_reported_together() {
        let mut s = Settings::default();
        s.auth.api_keys.push(ApiKey {
            sha256: "xyz".into(),
            tenant: "ghost".into(),
            scopes: vec!["vision:everything".into()],
        });
        let mut errors = Vec::new();
        s.validate(&mut errors);
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn jwt_leeway_and_retry_budgets_are_bounded() {
        let mut s = Settings::default();
        s.auth.jwt.leeway_s = 3_600;
        s.auth.jwt.issuer = Some(" ".into());
        s.routes.inference.retry_budget_percent = f32::NAN;
        s.routes.language.retry_budget_percent = -1.0;
        let mut errors = Vec::new();
        s.validate(&mut errors);
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains("`auth.jwt.leeway_s` must be at most 300"));
    }
}
