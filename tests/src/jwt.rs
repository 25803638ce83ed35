//! Keys for the gateway's JWT tests, made with `openssl` in a temporary folder: an HS256
//! secret, an RSA key pair (PEM files) and an EC key (a JWKS file).

use base64::Engine;

/// Runs `openssl` with `args`; panics if it fails.
pub fn openssl(args: &[&str]) {
    let ok = std::process::Command::new("openssl")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs")
        .success();
    assert!(ok, "openssl {args:?}");
}

/// The keys and the folder holding their files (`hs256.secret`, `rsa.pem`, `rsa.pub.pem`,
/// `ec.pem`, `jwks.json`).
pub struct JwtKeys {
    pub dir: tempfile::TempDir,
    pub secret: Vec<u8>,
    pub rsa_private: Vec<u8>,
    pub ec_private: Vec<u8>,
}

/// Makes a fresh set of keys.
pub fn jwt_keys() -> JwtKeys {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let secret = b"an-hs256-secret-of-at-least-32-bytes!".to_vec();
    std::fs::write(p("hs256.secret"), &secret).unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &p("rsa.pem"),
    ]);
    openssl(&[
        "pkey",
        "-in",
        &p("rsa.pem"),
        "-pubout",
        "-out",
        &p("rsa.pub.pem"),
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &p("ec.pem"),
    ]);
    openssl(&[
        "pkey",
        "-in",
        &p("ec.pem"),
        "-pubout",
        "-outform",
        "DER",
        "-out",
        &p("ec.pub.der"),
    ]);
    // An uncompressed P-256 public key ends its DER with x‖y (32 bytes each).
    let der = std::fs::read(p("ec.pub.der")).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256", "use": "sig",
        "x": b64(&der[der.len() - 64..der.len() - 32]), "y": b64(&der[der.len() - 32..]),
    }]});
    std::fs::write(p("jwks.json"), jwks.to_string()).unwrap();
    JwtKeys {
        secret,
        rsa_private: std::fs::read(p("rsa.pem")).unwrap(),
        ec_private: std::fs::read(p("ec.pem")).unwrap(),
        dir,
    }
}
