//! TLS and mTLS for the xDS port. Certificate, key and (for mTLS) the client
//! CA come from PEM files and are reloaded when the files change: each new
//! connection is handshaken with the newest configuration, while connections
//! already open keep theirs, so reloading never drops a stream. A file that
//! fails to load keeps the previous configuration in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Where the PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Build a server configuration from the files (HTTP/2 only: gRPC).
pub fn load(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .with_context(|| format!("reading the certificate chain {}", files.cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", files.cert.display());
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the private key {}", files.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(ca).with_context(|| format!("reading client CA {}", ca.display()))?
            {
                let cert = cert.with_context(|| format!("parsing client CA {}", ca.display()))?;
                roots.add(cert).with_context(|| format!("adding a client CA certificate from {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .with_context(|| format!("client CA {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).with_context(|| {
        format!("certificate {} and key {} do not match", files.cert.display(), files.key.display())
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration in force, and what it was loaded from.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<(Arc<ServerConfig>, Vec<Option<SystemTime>>)>,
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    files.paths().into_iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

impl ReloadingTls {
    pub fn new(files: TlsFiles) -> anyhow::Result<Arc<Self>> {
        let stamps = stamps(&files);
        let config = load(&files)?;
        Ok(Arc::new(ReloadingTls { files, current: RwLock::new((config, stamps)) }))
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// Reload if any file changed since the last load. Returns whether a new
    /// configuration is in force.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.files);
        if self.current.read().unwrap_or_else(|e| e.into_inner()).1 == now {
            return false;
        }
        match load(&self.files) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = (config, now);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
                true
            }
            Err(e) => {
                // Remember the stamps so a half-written file is retried only when it changes again.
                self.current.write().unwrap_or_else(|e| e.into_inner()).1 = now;
                tracing::error!("TLS reload failed, keeping the previous certificates: {e:#}");
                false
            }
        }
    }

    /// Check the files every `every` until the task is dropped.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.reload_if_changed();
        }
    }
}

/// Accept TCP connections and hand tonic the ones whose TLS handshake
/// succeeded. Handshakes run concurrently, each bounded by a timeout, so a
/// slow or silent peer holds up no one.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        // Ends when tonic drops the stream (server shut down).
        while !tx.is_closed() {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            crate::connection_age::no_delay(&tcp);
            let acceptor = TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!("cloudmap_xds_tls_handshake_failures_total").increment(1);
                        tracing::info!(%peer, "TLS handshake failed: {e}");
                    }
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
