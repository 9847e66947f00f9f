//! Mutual TLS inside the cluster: one cluster CA signs a certificate for every coordinator and
//! worker (and etcd's). With `--cluster-ca/--cluster-cert/--cluster-key`, the worker API (gRPC),
//! the communicator's links between ranks and every etcd client require the peer's certificate
//! to be signed by the CA, and present their own; a process without one cannot register, take
//! an assignment or join a mesh.
//!
//! Names: whoever connects to a coordinator or a worker checks that the certificate names
//! [`CLUSTER_NAME`] (pods come and go with new addresses; the CA is what identifies the
//! cluster). etcd's certificate names the host its endpoints use, as any TLS server's does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The DNS name every coordinator's and worker's certificate carries among its subject
/// alternative names.
pub const CLUSTER_NAME: &str = "tramontane.cluster";

/// The cluster's CA and this process's certificate (all three, or none: plain text).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterTlsArgs {
    /// The cluster CA (PEM). With it every link inside the cluster (worker API, communicator,
    /// etcd) is mutual TLS: peers must present a certificate it signed.
    #[arg(long, env = "TRAMONTANE_CLUSTER_CA", requires_all = ["cluster_cert", "cluster_key"])]
    pub cluster_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM), signed by the cluster CA, naming
    /// `tramontane.cluster`.
    #[arg(long, env = "TRAMONTANE_CLUSTER_CERT", requires = "cluster_ca")]
    pub cluster_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "TRAMONTANE_CLUSTER_KEY", requires = "cluster_ca")]
    pub cluster_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: {message}", path.display())]
    File { flag: &'static str, path: PathBuf, message: String },
    #[error("cluster TLS: {0}")]
    Config(String),
}

/// The cluster CA and this process's identity, checked at start.
#[derive(Clone)]
pub struct ClusterTls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls").finish_non_exhaustive()
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File { flag, path: path.to_owned(), message: e.to_string() })
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| TlsError::Config(format!("{what}: not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Config(format!("{what}: no certificate in it")));
    }
    Ok(chain)
}

impl ClusterTls {
    /// `None` without `--cluster-ca`.
    pub fn load(args: &ClusterTlsArgs) -> Result<Option<Self>, TlsError> {
        let (Some(ca), Some(cert), Some(key)) = (&args.cluster_ca, &args.cluster_cert, &args.cluster_key) else { return Ok(None) };
        let (ca_pem, cert_pem, key_pem) = (read("--cluster-ca", ca)?, read("--cluster-cert", cert)?, read("--cluster-key", key)?);
        Self::from_pem(ca_pem, cert_pem, key_pem).map(Some)
    }

    /// From the PEM texts of the CA, the certificate chain and its key.
    pub fn from_pem(ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certificates(&ca_pem, "--cluster-ca")? {
            roots.add(ca).map_err(|e| TlsError::Config(format!("--cluster-ca: {e}")))?;
        }
        let roots = Arc::new(roots);
        let chain = certificates(&cert_pem, "--cluster-cert")?;
        let key = || PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Config(format!("--cluster-key: no PEM private key in it: {e}")));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(format!("--cluster-ca: {e}")))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key()?)
            .map_err(|e| TlsError::Config(format!("--cluster-cert and --cluster-key: {e}")))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key()?)
            .map_err(|e| TlsError::Config(format!("--cluster-cert and --cluster-key: {e}")))?;
        Ok(ClusterTls { ca_pem, cert_pem, key_pem, server: Arc::new(server), client: Arc::new(client) })
    }

    fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// A cluster server's gRPC TLS (the worker API): its certificate, and the clients' required.
    pub fn grpc_server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new().identity(self.identity()).client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }

    /// A cluster client's gRPC TLS to a coordinator or worker.
    pub fn grpc_client(&self) -> tonic::transport::ClientTlsConfig {
        self.etcd().domain_name(CLUSTER_NAME)
    }

    /// An etcd client's TLS: etcd's certificate is checked against the host of its endpoint.
    pub fn etcd(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem)).identity(self.identity())
    }

    /// The accepting side of a link between ranks (requires the peer's certificate).
    pub fn link_server(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The dialing side of a link between ranks, and the name it checks.
    pub fn link_client(&self) -> (Arc<rustls::ClientConfig>, ServerName<'static>) {
        (self.client.clone(), ServerName::try_from(CLUSTER_NAME).expect("a valid DNS name"))
    }

    /// The scheme of a URL to a TLS server of the cluster.
    pub fn scheme(tls: Option<&ClusterTls>) -> &'static str {
        if tls.is_some() { "https" } else { "http" }
    }
}

/// A cluster CA made on the spot (`tramctl up --tls`, tests): it issues the certificates of a
/// cluster's processes, each valid as server and as client.
pub struct Authority {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn rcgen_error(e: rcgen::Error) -> TlsError {
    TlsError::Config(format!("making a certificate: {e}"))
}

impl Authority {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        Ok(Authority { cert, key })
    }

    pub fn ca_pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `common_name` naming [`CLUSTER_NAME`] and `hosts` (DNS names or IP
    /// addresses: what etcd's clients check).
    pub fn issue(&self, common_name: &str, hosts: &[&str]) -> Result<Issued, TlsError> {
        let names: Vec<String> = std::iter::once(CLUSTER_NAME).chain(hosts.iter().copied()).map(str::to_owned).collect();
        let mut params = rcgen::CertificateParams::new(names).map_err(rcgen_error)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(rcgen_error)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Writes `ca.pem`, `{name}.pem` and `{name}-key.pem` (readable by the owner only) into
    /// `dir` for a certificate [`Authority::issue`] makes; returns the flags' files.
    pub fn write(&self, dir: &Path, name: &str, hosts: &[&str]) -> Result<ClusterTlsArgs, TlsError> {
        let issued = self.issue(name, hosts)?;
        let files = ClusterTlsArgs {
            cluster_ca: Some(dir.join("ca.pem")),
            cluster_cert: Some(dir.join(format!("{name}.pem"))),
            cluster_key: Some(dir.join(format!("{name}-key.pem"))),
        };
        let write = |path: &Option<PathBuf>, text: &str, private: bool| {
            let path = path.as_ref().expect("set above");
            let io = |e: std::io::Error| TlsError::File { flag: "writing", path: path.clone(), message: e.to_string() };
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            if private {
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            }
            std::io::Write::write_all(&mut options.open(path).map_err(io)?, text.as_bytes()).map_err(io)
        };
        write(&files.cluster_ca, &self.ca_pem(), false)?;
        write(&files.cluster_cert, &issued.cert_pem, false)?;
        write(&files.cluster_key, &issued.key_pem, true)?;
        Ok(files)
    }
}

impl ClusterTlsArgs {
    /// The flags as a process's command line.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, path) in [("--cluster-ca", &self.cluster_ca), ("--cluster-cert", &self.cluster_cert), ("--cluster-key", &self.cluster_key)] {
            if let Some(p) = path {
                args.extend([flag.to_owned(), p.display().to_string()]);
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_load_and_a_missing_key_is_named() {
        let ca = Authority::new("test CA").unwrap();
        let node = ca.issue("worker", &["127.0.0.1", "localhost"]).unwrap();
        ClusterTls::from_pem(ca.ca_pem().into(), node.cert_pem.clone().into(), node.key_pem.into()).expect("a CA-signed certificate loads");
        let err = ClusterTls::from_pem(ca.ca_pem().into(), node.cert_pem.into(), b"no key".to_vec()).unwrap_err();
        assert!(err.to_string().contains("--cluster-key"), "{err}");
    }
}
