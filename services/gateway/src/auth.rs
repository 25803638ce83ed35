//! Authentication: API keys (stored as SHA-256 hashes, compared in constant time, never logged)
//! and JWT bearer tokens (HS256, RS256, ES256; `exp`, `nbf`, `iss`, `aud` checked). Each
//! credential resolves to a [`Principal`]: a configured tenant and its scopes.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use marquee_core::ServeError;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKey, AuthSettings, Tenant, validate_key};

/// Who is calling.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub tenant: String,
    pub scopes: Vec<String>,
    /// `api_key` or `jwt`, for metrics and logs.
    pub via: &'static str,
}

impl Principal {
    /// Whether this principal may use `scope` (`admin` may use everything).
    pub fn allows(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == "admin")
    }

    /// `PERMISSION_DENIED` unless the principal holds `scope`.
    pub fn require(&self, scope: &str) -> Result<(), ServeError> {
        if self.allows(scope) {
            Ok(())
        } else {
            Err(ServeError::PermissionDenied(format!(
                "tenant `{}` lacks scope `{scope}` (has: {})",
                self.tenant,
                if self.scopes.is_empty() {
                    "none".to_string()
                } else {
                    self.scopes.join(", ")
                }
            )))
        }
    }
}

/// Longest bearer JWT accepted, checked before it is decoded. Real tokens are well under 2 KiB;
/// 8 KiB leaves room for large RSA signatures and many scopes.
pub const MAX_JWT_BYTES: usize = 8 << 10;

struct JwtKey {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

/// Verifies credentials against the configured keys.
pub struct Authenticator {
    api_keys: Vec<([u8; 32], Arc<Principal>)>,
    jwt_keys: Vec<JwtKey>,
    jwt: crate::config::JwtSettings,
    tenants: BTreeMap<String, Tenant>,
}

impl Authenticator {
    /// Loads keys from settings and the files they name. Every problem is reported together.
    pub fn new(
        auth: &AuthSettings,
        tenants: &BTreeMap<String, Tenant>,
    ) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut entries: Vec<ApiKey> = auth.api_keys.clone();
        if let Some(path) = &auth.api_keys_file {
            #[derive(serde::Deserialize)]
            struct KeyFile {
                api_keys: Vec<ApiKey>,
            }
            match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|t| toml::from_str::<KeyFile>(&t).map_err(|e| e.to_string()))
            {
                Ok(f) => {
                    for (i, k) in f.api_keys.iter().enumerate() {
                        validate_key(
                            &format!("{}: api_keys[{i}]", path.display()),
                            k,
                            tenants,
                            &mut errors,
                        );
                    }
                    entries.extend(f.api_keys);
                }
                Err(e) => errors.push(format!("`auth.api_keys_file` `{}`: {e}", path.display())),
            }
        }
        let api_keys = entries
            .iter()
            .filter_map(|k| {
                let digest: [u8; 32] = hex::decode(&k.sha256).ok()?.try_into().ok()?;
                Some((
                    digest,
                    Arc::new(Principal {
                        tenant: k.tenant.clone(),
                        scopes: k.scopes.clone(),
                        via: "api_key",
                    }),
                ))
            })
            .collect();
        let mut jwt_keys = Vec::new();
        let jwt = &auth.jwt;
        if let Some(path) = &jwt.hs256_secret_file {
            match std::fs::read(path) {
                Ok(secret) if secret.len() >= 32 => match DecodingKey::from_secret(trim_newline(&secret)) {
                    Ok(key) => jwt_keys.push(JwtKey { alg: Algorithm::HS256, kid: None, key }),
                    Err(e) => errors.push(format!("`auth.jwt.hs256_secret_file`: {e}")),
                },
                Ok(secret) => errors.push(format!(
                    "`auth.jwt.hs256_secret_file` holds {} bytes; HS256 secrets must be at least 32 bytes",
                    secret.len()
                )),
                Err(e) => errors.push(format!("`auth.jwt.hs256_secret_file` `{}`: {e}", path.display())),
            }
        }
        for path in &jwt.public_key_files {
            match std::fs::read(path) {
                Ok(pem) => {
                    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                        jwt_keys.push(JwtKey {
                            alg: Algorithm::RS256,
                            kid: None,
                            key,
                        });
                    } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                        jwt_keys.push(JwtKey {
                            alg: Algorithm::ES256,
                            kid: None,
                            key,
                        });
                    } else {
                        errors.push(format!("`auth.jwt.public_key_files`: `{}` is neither an RSA nor an EC public key in PEM", path.display()));
                    }
                }
                Err(e) => errors.push(format!(
                    "`auth.jwt.public_key_files`: `{}`: {e}",
                    path.display()
                )),
            }
        }
        if let Some(path) = &jwt.jwks_file {
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(&t).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(set) => {
                    for jwk in &set.keys {
                        let alg = match &jwk.algorithm {
                            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                                Algorithm::ES256
                            }
                            _ => {
                                errors.push(format!(
                                    "`auth.jwt.jwks_file`: key `{:?}` is not RSA or EC",
                                    jwk.common.key_id
                                ));
                                continue;
                            }
                        };
                        match DecodingKey::from_jwk(jwk) {
                            Ok(key) => jwt_keys.push(JwtKey {
                                alg,
                                kid: jwk.common.key_id.clone(),
                                key,
                            }),
                            Err(e) => errors.push(format!("`auth.jwt.jwks_file`: {e}")),
                        }
                    }
                }
                Err(e) => errors.push(format!("`auth.jwt.jwks_file` `{}`: {e}", path.display())),
            }
        }
        if errors.is_empty() {
            Ok(Self {
                api_keys,
                jwt_keys,
                jwt: jwt.clone(),
                tenants: tenants.clone(),
            })
        } else {
            Err(errors)
        }
    }

    /// Resolves the request's credential: `x-api-key: KEY` or `authorization: Bearer TOKEN`
    /// (a JWT when it has three dot-separated parts, otherwise an API key).
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Principal>, ServeError> {
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| {
                        s.strip_prefix("Bearer ")
                            .or_else(|| s.strip_prefix("bearer "))
                    })
                    .map(str::trim)
                    .ok_or_else(|| {
                        ServeError::Unauthenticated(
                            "`authorization` must be `Bearer <token>`".into(),
                        )
                    })
            })
            .transpose()?;
        let api_key = headers.get("x-api-key").map(|v| v.as_bytes());
        match (api_key, bearer) {
            (Some(key), _) => self.api_key(key),
            (None, Some(token)) if token.split('.').count() == 3 => self.jwt(token),
            (None, Some(token)) => self.api_key(token.as_bytes()),
            (None, None) => Err(ServeError::Unauthenticated(
                "missing credentials: send `x-api-key: <key>` or `authorization: Bearer <token>`"
                    .into(),
            )),
        }
    }

    fn api_key(&self, key: &[u8]) -> Result<Arc<Principal>, ServeError> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        // Compare against every key, always, so timing does not reveal which (if any) matched.
        let mut found = None;
        for (hash, principal) in &self.api_keys {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(principal.clone());
            }
        }
        found.ok_or_else(|| ServeError::Unauthenticated("invalid API key".into()))
    }

    fn jwt(&self, token: &str) -> Result<Arc<Principal>, ServeError> {
        let bad = |m: String| ServeError::Unauthenticated(format!("invalid JWT: {m}"));
        // Bounded before any base64 or JSON parsing: a token is a header, not a payload.
        if token.len() > MAX_JWT_BYTES {
            return Err(bad(format!(
                "token is {} bytes; the limit is {MAX_JWT_BYTES}",
                token.len()
            )));
        }
        // `alg: none` and unknown algorithms fail here: they are not `Algorithm` values.
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(e.to_string()))?;
        let candidates: Vec<&JwtKey> = self
            .jwt_keys
            .iter()
            .filter(|k| {
                k.alg == header.alg
                    && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
            })
            .collect();
        if candidates.is_empty() {
            return Err(bad(format!(
                "no configured key for algorithm {:?}{}",
                header.alg,
                header
                    .kid
                    .map(|k| format!(" and kid `{k}`"))
                    .unwrap_or_default()
            )));
        }
        let mut last = None;
        for k in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &k.key,
                &self.validation(k.alg),
            ) {
                Ok(data) => return self.principal_from_claims(&data.claims),
                Err(e) => last = Some(e),
            }
        }
        let e = last.expect("at least one candidate was tried, this is a bug");
        use jsonwebtoken::errors::ErrorKind::*;
        Err(bad(match e.kind() {
            ExpiredSignature => "token has expired (`exp`)".into(),
            ImmatureSignature => "token is not valid yet (`nbf`)".into(),
            InvalidAudience => format!(
                "`aud` does not include `{}`",
                self.jwt.audience.as_deref().unwrap_or_default()
            ),
            InvalidIssuer => format!(
                "`iss` is not `{}`",
                self.jwt.issuer.as_deref().unwrap_or_default()
            ),
            InvalidSignature => "signature does not verify".into(),
            MissingRequiredClaim(c) => format!("required claim `{c}` is missing"),
            other => format!("{other:?}"),
        }))
    }

    /// The checks a token verified by a key of `alg` must pass. The algorithm is the key's own
    /// (never the token's choice alone), so an RSA public key can't be used as an HS256 secret.
    /// `exp` is always required; `iss` and `aud` are required whenever they are configured:
    /// the library only compares them when a token carries them, and a token without them was
    /// not issued for this gateway.
    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = self.jwt.leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &self.jwt.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.jwt.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    fn principal_from_claims(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Arc<Principal>, ServeError> {
        let claim = &self.jwt.tenant_claim;
        let tenant = claims.get(claim).and_then(|v| v.as_str()).ok_or_else(|| {
            ServeError::Unauthenticated(format!(
                "invalid JWT: claim `{claim}` (the tenant) is missing"
            ))
        })?;
        if !self.tenants.contains_key(tenant) {
            return Err(ServeError::PermissionDenied(format!(
                "tenant `{tenant}` is not configured on this gateway"
            )));
        }
        let scopes = match (claims.get("scope"), claims.get("scopes")) {
            (Some(serde_json::Value::String(s)), _) => {
                s.split_whitespace().map(str::to_owned).collect()
            }
            (_, Some(serde_json::Value::Array(a))) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Arc::new(Principal {
            tenant: tenant.to_string(),
            scopes,
            via: "jwt",
        }))
    }
}

fn trim_newline(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\n").unwrap_or(b)
}

/// The lowercase hex SHA-256 of an API key, as configured in `auth.api_keys[].sha256`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}
