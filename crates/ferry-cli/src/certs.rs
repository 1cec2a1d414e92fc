//! `ferry certs dev`: a development certificate authority with one server certificate for
//! ferry-cloud and one client certificate for ferryd, for mutual TLS between the two tiers on a
//! development machine or a test network.
//!
//! The file names are a contract shared with both configs (`[tls]` of ferry-cloud, `[cloud]` of
//! ferryd): `ca.pem`/`ca.key` (the CA), `cloud.pem`/`cloud.key` (server authentication; SANs
//! `localhost`, `127.0.0.1`, `::1` and any `--san`), `edge.pem`/`edge.key` (client
//! authentication, CN `ferry-edge`). Keys are ECDSA P-256 in PKCS#8 PEM, written with mode 0600;
//! existing files are never overwritten unless asked to. Production deployments use their own CA.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The CA certificate (PEM): ferry-cloud's `tls.client_ca_file` and ferryd's `cloud.ca_file`.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (PEM), to sign more certificates later.
pub const CA_KEY: &str = "ca.key";
/// ferry-cloud's server certificate (PEM): `tls.cert_file`.
pub const CLOUD_CERT: &str = "cloud.pem";
/// ferry-cloud's private key (PEM): `tls.key_file`.
pub const CLOUD_KEY: &str = "cloud.key";
/// ferryd's client certificate (PEM): `cloud.cert_file`.
pub const EDGE_CERT: &str = "edge.pem";
/// ferryd's private key (PEM): `cloud.key_file`.
pub const EDGE_KEY: &str = "edge.key";
/// The common name of the edge's client certificate.
pub const EDGE_COMMON_NAME: &str = "ferry-edge";
/// The server name ferryd checks ferry-cloud's certificate against by default.
pub const CLOUD_DOMAIN_NAME: &str = "localhost";
/// Longest validity accepted, in days.
pub const MAX_DAYS: u32 = 36_500;

/// Every file `ferry certs dev` writes, in the order it writes them.
pub const FILES: [&str; 6] = [CA_CERT, CA_KEY, CLOUD_CERT, CLOUD_KEY, EDGE_CERT, EDGE_KEY];

/// Why the certificates were not written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A `--san` that is neither an IP address nor a valid DNS name.
    #[error("--san `{0}` is neither an IP address nor a DNS name")]
    BadSan(String),
    /// `--days` out of range.
    #[error("--days must be between 1 and {MAX_DAYS}, not {0}")]
    BadDays(u32),
    /// A file is already there and `--force` was not given.
    #[error("{} already exists; pass --force to replace the development certificates", .0.display())]
    Exists(PathBuf),
    /// rcgen refused a certificate.
    #[error("making the {what} certificate: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    /// Writing a file failed.
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to make.
#[derive(Debug, Clone)]
pub struct DevCertsOptions {
    /// Output directory (created, mode 0700, when missing).
    pub out: PathBuf,
    /// Extra subject alternative names of the cloud certificate (DNS names or IP addresses).
    pub sans: Vec<String>,
    /// Validity in days, from yesterday (clock skew) on.
    pub days: u32,
    /// Replace existing files.
    pub force: bool,
}

impl Default for DevCertsOptions {
    fn default() -> Self {
        DevCertsOptions {
            out: PathBuf::from("certs/dev"),
            sans: Vec::new(),
            days: 365,
            force: false,
        }
    }
}

/// The files written.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub dir: PathBuf,
    /// The cloud certificate's subject alternative names.
    pub sans: Vec<String>,
}

impl DevCerts {
    /// Path of one of [`FILES`].
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The civil date (year, month, day) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// The UTC date `offset_days` from today.
fn day(offset_days: i64) -> (i32, u8, u8) {
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    civil_from_days(today + offset_days)
}

/// Parameters valid from `valid_days.0` to `valid_days.1` days from today.
fn params(
    common_name: &str,
    sans: &[String],
    valid_days: (i64, i64),
    what: &'static str,
) -> Result<CertificateParams, CertsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())
        .map_err(|source| CertsError::Generate { what, source })?;
    for s in sans {
        let san = match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                let valid = !s.is_empty()
                    && s.len() <= 253
                    && s.split('.').all(|label| {
                        !label.is_empty()
                            && label.len() <= 63
                            && !label.starts_with('-')
                            && !label.ends_with('-')
                            && label
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
                    });
                if !valid {
                    return Err(CertsError::BadSan(s.clone()));
                }
                SanType::DnsName(
                    s.as_str()
                        .try_into()
                        .map_err(|_| CertsError::BadSan(s.clone()))?,
                )
            }
        };
        p.subject_alt_names.push(san);
    }
    p.distinguished_name
        .push(DnType::OrganizationName, "ferry (development)");
    p.distinguished_name.push(DnType::CommonName, common_name);
    let ((y0, m0, d0), (y1, m1, d1)) = (day(valid_days.0), day(valid_days.1));
    p.not_before = rcgen::date_time_ymd(y0, m0, d0);
    p.not_after = rcgen::date_time_ymd(y1, m1, d1);
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// The development CA's parameters (its subject is what leaves name as their issuer).
fn ca_params(days: u32) -> Result<CertificateParams, CertsError> {
    let mut ca = params("ferry development CA", &[], (-1, i64::from(days)), "CA")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.use_authority_key_identifier_extension = false;
    Ok(ca)
}

/// An edge (client) certificate's parameters, valid from `valid_days.0` to `valid_days.1` days
/// from today.
fn edge_params(valid_days: (i64, i64)) -> Result<CertificateParams, CertsError> {
    let mut edge = params(
        EDGE_COMMON_NAME,
        &[EDGE_COMMON_NAME.to_string()],
        valid_days,
        "edge",
    )?;
    edge.is_ca = IsCa::ExplicitNoCa;
    edge.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    edge.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(edge)
}

/// One more edge (client) certificate from an existing development CA, given its key, valid
/// from `valid_days.0` to `valid_days.1` days from today (negative: in the past): (certificate
/// PEM, key PEM). The security tests make expired and not-yet-valid certificates with it.
pub fn edge_cert_from_ca(
    ca_key_pem: &str,
    valid_days: (i64, i64),
) -> Result<(String, String), CertsError> {
    let what = "edge";
    let ca_key =
        KeyPair::from_pem(ca_key_pem).map_err(|source| CertsError::Generate { what, source })?;
    let issuer = Issuer::new(ca_params(MAX_DAYS)?, &ca_key);
    let key = KeyPair::generate().map_err(|source| CertsError::Generate { what, source })?;
    let cert = edge_params(valid_days)?
        .signed_by(&key, &issuer)
        .map_err(|source| CertsError::Generate { what, source })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Makes the CA and the two leaf certificates in memory: (file name, PEM text) in [`FILES`]
/// order. Nothing is written.
pub fn generate(sans: &[String], days: u32) -> Result<Vec<(&'static str, String)>, CertsError> {
    if days == 0 || days > MAX_DAYS {
        return Err(CertsError::BadDays(days));
    }
    let key = |what| KeyPair::generate().map_err(|source| CertsError::Generate { what, source });

    let ca_key = key("CA")?;
    let ca = ca_params(days)?;
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|source| CertsError::Generate { what: "CA", source })?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, &ca_key);

    let mut cloud_sans: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in sans {
        if !cloud_sans.contains(s) {
            cloud_sans.push(s.clone());
        }
    }
    let cloud_key = key("cloud")?;
    let window = (-1, i64::from(days));
    let mut cloud = params("ferry-cloud", &cloud_sans, window, "cloud")?;
    cloud.is_ca = IsCa::ExplicitNoCa;
    cloud.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    cloud.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cloud_cert =
        cloud
            .signed_by(&cloud_key, &issuer)
            .map_err(|source| CertsError::Generate {
                what: "cloud",
                source,
            })?;

    let edge_key = key("edge")?;
    let edge_cert = edge_params(window)?
        .signed_by(&edge_key, &issuer)
        .map_err(|source| CertsError::Generate {
            what: "edge",
            source,
        })?;

    Ok(vec![
        (CA_CERT, ca_pem),
        (CA_KEY, ca_key.serialize_pem()),
        (CLOUD_CERT, cloud_cert.pem()),
        (CLOUD_KEY, cloud_key.serialize_pem()),
        (EDGE_CERT, edge_cert.pem()),
        (EDGE_KEY, edge_key.serialize_pem()),
    ])
}

/// Writes one file: keys 0600, certificates 0644; `force` replaces (and re-restricts) an
/// existing one.
fn write_file(path: &Path, text: &str, secret: bool, force: bool) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mode = if secret { 0o600 } else { 0o644 };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertsError::Exists(path.to_path_buf())
        } else {
            io(e)
        }
    })?;
    // `mode` only applies to new files; a replaced key must not keep wider permissions.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// `ferry certs dev`: makes the certificates and writes the six [`FILES`] into `opts.out`.
/// Refuses (before writing anything) when one of them exists, unless `opts.force`.
pub fn write_dev_certs(opts: &DevCertsOptions) -> Result<DevCerts, CertsError> {
    let files = generate(&opts.sans, opts.days)?;
    if !opts.force {
        if let Some(existing) = FILES.iter().map(|f| opts.out.join(f)).find(|p| p.exists()) {
            return Err(CertsError::Exists(existing));
        }
    }
    if !opts.out.is_dir() {
        std::fs::create_dir_all(&opts.out).map_err(|source| CertsError::Io {
            path: opts.out.clone(),
            source,
        })?;
        // It holds private keys.
        std::fs::set_permissions(&opts.out, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| CertsError::Io {
                path: opts.out.clone(),
                source,
            },
        )?;
    }
    for (name, text) in &files {
        write_file(
            &opts.out.join(name),
            text,
            name.ends_with(".key"),
            opts.force,
        )?;
    }
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for s in &opts.sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    Ok(DevCerts {
        dir: opts.out.clone(),
        sans,
    })
}

/// The config snippets that use the certificates: ferry-cloud's `[tls]` and ferryd's `[cloud]`.
pub fn config_snippets(certs: &DevCerts) -> String {
    let p = |name: &str| certs.path(name).display().to_string();
    format!(
        "# configs/cloud.toml (ferry-cloud): mutual TLS, a client certificate signed by the CA is required
[tls]
cert_file = \"{cloud_cert}\"
key_file = \"{cloud_key}\"
client_ca_file = \"{ca}\"

# configs/edge.toml (ferryd): the offload client's certificate, and the CA it trusts for ferry-cloud
[cloud]
ca_file = \"{ca}\"
cert_file = \"{edge_cert}\"
key_file = \"{edge_key}\"
# ferry-cloud's certificate names: {sans} (the TLS domain name defaults to \"{domain}\")
",
        cloud_cert = p(CLOUD_CERT),
        cloud_key = p(CLOUD_KEY),
        ca = p(CA_CERT),
        edge_cert = p(EDGE_CERT),
        edge_key = p(EDGE_KEY),
        sans = certs.sans.join(", "),
        domain = CLOUD_DOMAIN_NAME,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn writes_six_files_keys_private_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs/dev");
        let opts = DevCertsOptions {
            out: out.clone(),
            sans: vec!["cloud.example.org".into(), "10.0.0.7".into()],
            ..DevCertsOptions::default()
        };
        let certs = write_dev_certs(&opts).unwrap();
        assert!(certs.sans.contains(&"10.0.0.7".to_string()));
        for f in FILES {
            let meta = std::fs::metadata(out.join(f)).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if f.ends_with(".key") {
                assert_eq!(mode, 0o600, "{f}");
                let text = std::fs::read_to_string(out.join(f)).unwrap();
                assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{f}");
            } else {
                let text = std::fs::read_to_string(out.join(f)).unwrap();
                assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{f}");
            }
        }
        let before = std::fs::read(out.join(CA_KEY)).unwrap();
        let e = write_dev_certs(&opts).unwrap_err();
        assert!(matches!(e, CertsError::Exists(_)), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read(out.join(CA_KEY)).unwrap(), before);
        std::fs::set_permissions(out.join(EDGE_KEY), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        write_dev_certs(&DevCertsOptions {
            force: true,
            ..opts
        })
        .unwrap();
        assert_ne!(std::fs::read(out.join(CA_KEY)).unwrap(), before);
        let mode = std::fs::metadata(out.join(EDGE_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let snippets = config_snippets(&certs);
        assert!(snippets.contains("client_ca_file") && snippets.contains("edge.key"));
    }

    #[test]
    fn refuses_bad_input() {
        for bad in ["", "bad name", "-x.example", "a..b"] {
            let e = generate(&[bad.to_string()], 30).unwrap_err();
            assert!(matches!(e, CertsError::BadSan(_)), "{bad}: {e}");
        }
        assert!(matches!(generate(&[], 0), Err(CertsError::BadDays(0))));
        assert!(matches!(
            generate(&[], MAX_DAYS + 1),
            Err(CertsError::BadDays(_))
        ));
    }
}
