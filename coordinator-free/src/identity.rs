//! Who this peer is, and how peers prove who they are to each other.
//!
//! A peer's identity is one Ed25519 key pair, created on first run and kept in the data
//! directory. The [`PeerId`] is the public key itself, so nothing else has to be trusted to bind
//! a name to a key. The same key:
//!
//! * sits in a self-signed X.509 certificate that both sides present in the QUIC/TLS 1.3
//!   handshake (mutual authentication); the custom verifiers below accept exactly one such
//!   certificate, check the handshake signature with its key and derive the peer id from it
//!   (the approach of libp2p's TLS spec, simplified because Ed25519 is itself a TLS 1.3
//!   signature scheme, so no extra signed extension is needed);
//! * signs the membership adverts ([`KeyAuth`]).
//!
//! ring is the only crypto provider, explicitly, so no process-wide default has to be
//! installed and no second provider is ever linked in.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::membership::AdvertAuth;
use crate::peer_id::{PEER_ID_LEN, PeerId};

/// ALPN protocol id: the wire protocol's major version. A peer speaking another version fails
/// the handshake instead of sending bytes we would misread.
pub const ALPN: &[u8] = b"cf/2";
/// ALPN protocol id of job links: connections that carry one job's leases, results and blobs,
/// apart from the membership connection.
pub const JOB_ALPN: &[u8] = b"cf-job/4";
/// ALPN protocol id of a job link a worker opens to a submitter to ask for work (the reverse
/// of [`JOB_ALPN`], for workers the submitter cannot dial).
pub const PULL_ALPN: &[u8] = b"cf-pull/4";
/// ALPN protocol id of a blob link: a worker fetching a blob from another worker that holds it.
pub const BLOB_ALPN: &[u8] = b"cf-blob/2";
/// ALPN protocol id of an overlay link: the partial-view overlay's messages (`overlay`). Version
/// 2: job adverts name a relay, and an advert wanting no workers withdraws its job.
pub const OVERLAY_ALPN: &[u8] = b"cf-overlay/2";
/// ALPN protocol id of a survey link: one question about a peer's views and capacity
/// (`survey`).
pub const SURVEY_ALPN: &[u8] = b"cf-survey/1";
/// ALPN protocol id of a relay link: a reservation on a relay, or a request to be introduced
/// to a peer that holds one (`relay`).
pub const RELAY_ALPN: &[u8] = b"cf-relay/1";
/// The name every dial presents as SNI. Identity comes from the certificate key, never from a
/// name, so this is a constant.
pub const SERVER_NAME: &str = "coordinator-free";
/// The key file inside the data directory.
pub const KEY_FILE: &str = "identity.key";

/// Longest key file read: a PKCS#8 Ed25519 document is 83–85 bytes.
const MAX_KEY_FILE: u64 = 4096;
/// Largest certificate accepted from a peer. Ours are about 300 bytes.
const MAX_CERT_BYTES: usize = 2048;
/// DER of SubjectPublicKeyInfo { algorithm: id-Ed25519 (1.3.101.112) } up to the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER of AlgorithmIdentifier { id-Ed25519 }, the only certificate signature algorithm taken.
const ED25519_ALG_ID: [u8; 7] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];

/// Why the local identity could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write key file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("key file {path} is not an Ed25519 PKCS#8 key")]
    BadKey { path: PathBuf },
    #[error("not an Ed25519 PKCS#8 key")]
    BadKeyBytes,
    #[error("key file {path} is larger than any key ({len} bytes)")]
    KeyFileTooLarge { path: PathBuf, len: u64 },
    #[error("cannot generate a key: {0}")]
    Generate(&'static str),
    #[error("cannot build the certificate")]
    Certificate(#[source] rcgen::Error),
    #[error("cannot build the TLS configuration")]
    Tls(#[source] rustls::Error),
}

/// Why a peer's certificate was refused. Carried inside the rustls error, so it also names
/// the reason in the handshake failure the remote and the logs see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("peer presented {count} certificates, exactly one is accepted")]
    ChainLength { count: usize },
    #[error("peer certificate is {len} bytes, at most {MAX_CERT_BYTES} accepted")]
    TooLarge { len: usize },
    #[error("peer certificate is not valid DER X.509")]
    Malformed,
    #[error("peer certificate key is not Ed25519")]
    NotEd25519,
    #[error("peer certificate is not self-signed by its own key")]
    BadSelfSignature,
    #[error("peer is {actual}, but {expected} was dialed")]
    WrongPeer { expected: PeerId, actual: PeerId },
    #[error("peer {peer} is not on the allow-list")]
    NotAllowed { peer: PeerId },
}

impl From<CertError> for rustls::Error {
    fn from(err: CertError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            err,
        ))))
    }
}

/// This peer's key pair and the certificate carrying it.
pub struct Identity {
    key: Arc<Ed25519KeyPair>,
    pkcs8: Vec<u8>,
    id: PeerId,
    cert: CertificateDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Identity").field("id", &self.id).finish()
    }
}

impl Identity {
    /// A fresh random identity (tests, and first runs).
    pub fn generate() -> Result<Self, IdentityError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| IdentityError::Generate("system randomness unavailable"))?;
        Self::from_pkcs8(doc.as_ref().to_vec())
            .map_err(|_| IdentityError::Generate("ring produced an unusable key"))
    }

    /// An identity from a PKCS#8 document, as stored in the key file.
    pub fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self, IdentityError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|_| IdentityError::BadKeyBytes)?;
        let public: [u8; PEER_ID_LEN] = key
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| IdentityError::BadKeyBytes)?;
        let id = PeerId::from_bytes(public);
        let cert = self_signed_cert(&pkcs8, &id)?;
        Ok(Self {
            key: Arc::new(key),
            pkcs8,
            id,
            cert,
        })
    }

    /// Loads the identity kept in `dir`, creating the directory (mode 0700) and a new key
    /// (mode 0600) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        create_private_dir(dir)?;
        let path = dir.join(KEY_FILE);
        match read_key_file(&path) {
            Ok(pkcs8) => {
                Self::from_pkcs8(pkcs8).map_err(|_| IdentityError::BadKey { path: path.clone() })
            }
            Err(IdentityError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let fresh = Self::generate()?;
                match write_new_key_file(&path, &fresh.pkcs8) {
                    Ok(()) => {
                        tracing::info!(peer = %fresh.id, path = %path.display(), "created a new identity");
                        Ok(fresh)
                    }
                    // Another process created it between our read and our write: use theirs,
                    // so both agree on one identity.
                    Err(IdentityError::Write { source, .. })
                        if source.kind() == io::ErrorKind::AlreadyExists =>
                    {
                        let pkcs8 = read_key_file(&path)?;
                        Self::from_pkcs8(pkcs8).map_err(|_| IdentityError::BadKey { path })
                    }
                    Err(err) => Err(err),
                }
            }
            Err(err) => Err(err),
        }
    }

    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The DER certificate presented in handshakes.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Signs `message` with the identity key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.key.sign(message).as_ref());
        out
    }

    /// The advert signer for the membership state machine.
    pub fn advert_auth(&self) -> KeyAuth {
        KeyAuth {
            key: Arc::clone(&self.key),
        }
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }

    /// TLS configuration for accepting connections: client certificates are mandatory and
    /// checked by [`PeerVerifier`], with the allow-list if one is given.
    pub fn server_config(
        &self,
        allow: Option<Arc<AllowList>>,
    ) -> Result<rustls::ServerConfig, IdentityError> {
        let verifier = Arc::new(PeerVerifier {
            expected: None,
            allow,
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(IdentityError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.private_key())
            .map_err(IdentityError::Tls)?;
        config.alpn_protocols = [
            ALPN,
            JOB_ALPN,
            PULL_ALPN,
            BLOB_ALPN,
            OVERLAY_ALPN,
            SURVEY_ALPN,
            RELAY_ALPN,
        ]
        .iter()
        .map(|p| p.to_vec())
        .collect();
        Ok(config)
    }

    /// TLS configuration for one dial: when `expected` is set, the handshake fails unless the
    /// remote proves exactly that id.
    pub fn client_config(
        &self,
        expected: Option<PeerId>,
        allow: Option<Arc<AllowList>>,
    ) -> Result<rustls::ClientConfig, IdentityError> {
        self.client_config_for(expected, allow, ALPN)
    }

    /// [`Self::client_config`] for the protocol `alpn` ([`ALPN`] or [`JOB_ALPN`]).
    pub fn client_config_for(
        &self,
        expected: Option<PeerId>,
        allow: Option<Arc<AllowList>>,
        alpn: &[u8],
    ) -> Result<rustls::ClientConfig, IdentityError> {
        let verifier = Arc::new(PeerVerifier { expected, allow });
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(IdentityError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.cert.clone()], self.private_key())
            .map_err(IdentityError::Tls)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn self_signed_cert(pkcs8: &[u8], id: &PeerId) -> Result<CertificateDer<'static>, IdentityError> {
    let der = PrivatePkcs8KeyDer::from(pkcs8);
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(IdentityError::Certificate)?;
    // The name is informational only: verifiers look at the key, never at names or dates.
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
        .map_err(IdentityError::Certificate)?;
    let mut params = params;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id.to_string());
    let cert = params
        .self_signed(&key_pair)
        .map_err(IdentityError::Certificate)?;
    Ok(cert.der().clone())
}

fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    let err = |source| IdentityError::CreateDir {
        path: dir.to_owned(),
        source,
    };
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(err)
}

fn read_key_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let err = |source| IdentityError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(err)?;
    if meta.len() > MAX_KEY_FILE {
        return Err(IdentityError::KeyFileTooLarge {
            path: path.to_owned(),
            len: meta.len(),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            // Someone loosened it; the key is only as secret as this file.
            tracing::warn!(path = %path.display(), "key file was readable by others; restricting it to 0600");
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
    }
    fs::read(path).map_err(err)
}

/// Writes the key to a temporary file (0600 from its creation, synced), then links it into
/// place: a crash leaves either no key file or a complete one, and linking never replaces a
/// key another process wrote meanwhile.
fn write_new_key_file(path: &Path, pkcs8: &[u8]) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(pkcs8)?;
        file.sync_all()?;
        fs::hard_link(&tmp, path)?;
        if let Some(parent) = path.parent()
            && let Ok(dir) = fs::File::open(parent)
        {
            // Make the new directory entry durable too; best effort on odd filesystems.
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(err)
}

/// Signs and verifies membership adverts with Ed25519.
#[derive(Clone)]
pub struct KeyAuth {
    key: Arc<Ed25519KeyPair>,
}

impl fmt::Debug for KeyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAuth").finish_non_exhaustive()
    }
}

impl AdvertAuth for KeyAuth {
    fn sign(&self, bytes: &[u8]) -> Vec<u8> {
        self.key.sign(bytes).as_ref().to_vec()
    }

    fn verify(&self, peer: &PeerId, bytes: &[u8], sig: &[u8]) -> bool {
        verify_ed25519(peer, bytes, sig)
    }
}

/// The overlay's peer infos are sealed with the same key: a copy's id, address and issue time
/// under the peer's own signature.
impl crate::overlay::Seal for KeyAuth {
    fn sign(&self, info: &crate::overlay::PeerInfo) -> crate::overlay::Signature {
        let mut signature = [0u8; 64];
        signature.copy_from_slice(self.key.sign(&info.signed_bytes()).as_ref());
        crate::overlay::Signature(signature)
    }

    fn verify(&self, info: &crate::overlay::PeerInfo) -> bool {
        verify_ed25519(&info.id, &info.signed_bytes(), &info.signature.0)
    }
}

/// Whether `sig` is `peer`'s Ed25519 signature over `message`.
pub fn verify_ed25519(peer: &PeerId, message: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&signature::ED25519, peer.as_bytes())
        .verify(message, sig)
        .is_ok()
}

/// Peer ids allowed to connect in lab mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    ids: BTreeSet<PeerId>,
}

/// Why an allow-list file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    #[error("cannot read allow-list {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("allow-list {path}, line {line}: not a peer id")]
    BadId {
        path: PathBuf,
        line: usize,
        #[source]
        source: crate::peer_id::ParsePeerIdError,
    },
    #[error("allow-list {path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
}

impl AllowList {
    /// Largest allow-list file read (about 10,000 ids).
    pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

    pub fn new(ids: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            ids: ids.into_iter().collect(),
        }
    }

    /// The peers on the list.
    pub fn ids(&self) -> impl Iterator<Item = &PeerId> {
        self.ids.iter()
    }

    pub fn contains(&self, id: &PeerId) -> bool {
        self.ids.contains(id)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// One peer id per line; blank lines and text after `#` are ignored.
    pub fn parse(path: &Path, text: &str) -> Result<Self, AllowListError> {
        let mut ids = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let id = line.parse().map_err(|source| AllowListError::BadId {
                path: path.to_owned(),
                line: i + 1,
                source,
            })?;
            ids.insert(id);
        }
        Ok(Self { ids })
    }

    pub fn load(path: &Path) -> Result<Self, AllowListError> {
        let read_err = |source| AllowListError::Read {
            path: path.to_owned(),
            source,
        };
        let len = fs::metadata(path).map_err(read_err)?.len();
        if len > Self::MAX_FILE_BYTES {
            return Err(AllowListError::TooLarge {
                path: path.to_owned(),
                max: Self::MAX_FILE_BYTES,
            });
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        Self::parse(path, &text)
    }
}

/// Verifies the remote side of a handshake, as server or as client.
#[derive(Debug)]
struct PeerVerifier {
    expected: Option<PeerId>,
    allow: Option<Arc<AllowList>>,
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<PeerId, CertError> {
        if !intermediates.is_empty() {
            return Err(CertError::ChainLength {
                count: intermediates.len() + 1,
            });
        }
        let peer = peer_id_of_cert(end_entity)?;
        if let Some(expected) = self.expected
            && expected != peer
        {
            return Err(CertError::WrongPeer {
                expected,
                actual: peer,
            });
        }
        if let Some(allow) = &self.allow
            && !allow.contains(&peer)
        {
            return Err(CertError::NotAllowed { peer });
        }
        Ok(peer)
    }

    fn check_logged(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        self.check(end_entity, intermediates)
            .map(|_| ())
            .map_err(|err| {
                tracing::info!(%err, "peer certificate refused");
                err.into()
            })
    }
}

/// Checks the TLS 1.3 CertificateVerify signature: Ed25519 only, by the certificate's key.
fn verify_handshake(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let peer = peer_id_of_cert(cert)?;
    if verify_ed25519(&peer, message, dss.signature()) {
        Ok(HandshakeSignatureValid::assertion())
    } else {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::BadSignature,
        ))
    }
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_logged(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check_logged(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The authenticated peer id of an established connection (the handshake checked it).
pub fn connection_peer_id(conn: &quinn::Connection) -> Option<PeerId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    match certs.as_slice() {
        [cert] => peer_id_of_cert(cert).ok(),
        _ => None,
    }
}

/// The peer id carried by a certificate: it must be X.509 DER, have an Ed25519 key and be
/// signed by that same key. Names, dates and extensions are deliberately ignored: the key is
/// the identity.
pub fn peer_id_of_cert(cert: &[u8]) -> Result<PeerId, CertError> {
    if cert.len() > MAX_CERT_BYTES {
        return Err(CertError::TooLarge { len: cert.len() });
    }
    let (certificate, rest) = der::expect(cert, der::SEQUENCE)?;
    if !rest.is_empty() {
        return Err(CertError::Malformed);
    }
    let tbs_start = certificate.content;
    let (tbs, rest) = der::expect(tbs_start, der::SEQUENCE)?;
    let tbs_bytes = &tbs_start[..tbs_start.len() - rest.len()];
    let (sig_alg, rest) = der::expect(rest, der::SEQUENCE)?;
    let (sig, rest) = der::expect(rest, der::BIT_STRING)?;
    if !rest.is_empty() {
        return Err(CertError::Malformed);
    }

    // tbsCertificate: [0] version, serial, signature, issuer, validity, subject, spki, ...
    let mut fields = tbs.content;
    let (first, rest) = der::any(fields)?;
    fields = if first.tag == der::VERSION_TAG {
        der::expect(rest, der::INTEGER)?.1
    } else if first.tag == der::INTEGER {
        rest
    } else {
        return Err(CertError::Malformed);
    };
    for _ in 0..4 {
        // signature, issuer, validity, subject
        fields = der::expect(fields, der::SEQUENCE)?.1;
    }
    let (spki, _) = der::expect(fields, der::SEQUENCE)?;
    let key = spki
        .whole
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .ok_or(CertError::NotEd25519)?;
    let key: [u8; PEER_ID_LEN] = key.try_into().map_err(|_| CertError::NotEd25519)?;
    let peer = PeerId::from_bytes(key);

    if sig_alg.whole != ED25519_ALG_ID {
        return Err(CertError::NotEd25519);
    }
    // BIT STRING: one byte of unused-bit count (0), then the 64-byte signature.
    let signature = match sig.content {
        [0, signature @ ..] if signature.len() == 64 => signature,
        _ => return Err(CertError::BadSelfSignature),
    };
    if !verify_ed25519(&peer, tbs_bytes, signature) {
        return Err(CertError::BadSelfSignature);
    }
    Ok(peer)
}

/// Just enough DER to walk a certificate; every length is checked against the input.
pub(crate) mod der {
    use super::CertError;

    pub const INTEGER: u8 = 0x02;
    pub const BIT_STRING: u8 = 0x03;
    pub const SEQUENCE: u8 = 0x30;
    pub const VERSION_TAG: u8 = 0xa0;

    pub struct Tlv<'a> {
        pub tag: u8,
        pub content: &'a [u8],
        pub whole: &'a [u8],
    }

    /// The first TLV of `input` and what follows it.
    pub fn any(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), CertError> {
        let (&tag, rest) = input.split_first().ok_or(CertError::Malformed)?;
        if tag & 0x1f == 0x1f {
            // High tag numbers never occur in the fields we read.
            return Err(CertError::Malformed);
        }
        let (&first, mut rest) = rest.split_first().ok_or(CertError::Malformed)?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 2 {
                // Indefinite length is not DER; more than 64 KiB exceeds any cert we take.
                return Err(CertError::Malformed);
            }
            let (bytes, after) = rest.split_at_checked(n).ok_or(CertError::Malformed)?;
            rest = after;
            let len = bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            if len < 0x80 || (n == 2 && len < 0x100) {
                return Err(CertError::Malformed);
            }
            len
        };
        let header = input.len() - rest.len();
        let (content, after) = rest.split_at_checked(len).ok_or(CertError::Malformed)?;
        Ok((
            Tlv {
                tag,
                content,
                whole: &input[..header + len],
            },
            after,
        ))
    }

    pub fn expect(input: &[u8], tag: u8) -> Result<(Tlv<'_>, &[u8]), CertError> {
        let (tlv, rest) = any(input)?;
        if tlv.tag != tag {
            return Err(CertError::Malformed);
        }
        Ok((tlv, rest))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn overlay_infos_are_sealed_by_their_peer_only() {
        use crate::overlay::{PeerInfo, Seal};
        let a = super::Identity::generate().unwrap();
        let b = super::Identity::generate().unwrap();
        let addr = "192.0.2.7:7401".parse().unwrap();
        let mut info = PeerInfo::new(a.id(), addr, 1_700_000_000_000);
        info.signature = Seal::sign(&a.advert_auth(), &info);
        // Anyone checks it with any key handle: the id names the key.
        assert!(Seal::verify(&b.advert_auth(), &info));
        // Another issue time, address or signer is refused.
        let mut later = info;
        later.issued += 1;
        assert!(!Seal::verify(&b.advert_auth(), &later));
        let mut moved = info;
        moved.addr = "192.0.2.8:7401".parse().unwrap();
        assert!(!Seal::verify(&a.advert_auth(), &moved));
        let mut forged = PeerInfo::new(a.id(), addr, 1_700_000_000_000);
        forged.signature = Seal::sign(&b.advert_auth(), &forged);
        assert!(!Seal::verify(&a.advert_auth(), &forged));
    }

    use super::*;

    #[test]
    fn certificate_carries_the_peer_id() {
        let identity = Identity::generate().expect("identity");
        assert_eq!(peer_id_of_cert(identity.certificate()), Ok(identity.id()));
    }

    #[test]
    fn tampered_certificate_is_refused() {
        let identity = Identity::generate().expect("identity");
        let cert = identity.certificate().to_vec();
        // Flip a byte in the middle (inside tbsCertificate): the self-signature breaks or
        // the structure does; either way no id comes out.
        let mut bad = cert.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x01;
        assert!(peer_id_of_cert(&bad).is_err());
        for len in 0..cert.len() {
            assert!(peer_id_of_cert(&cert[..len]).is_err());
        }
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = Identity::load_or_create(&data).expect("create");
        let again = Identity::load_or_create(&data).expect("load");
        assert_eq!(first.id(), again.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(data.join(KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn garbage_key_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(KEY_FILE), b"not a key").expect("write");
        assert!(matches!(
            Identity::load_or_create(dir.path()),
            Err(IdentityError::BadKey { .. })
        ));
    }

    #[test]
    fn advert_signatures_verify_only_for_the_signer() {
        let a = Identity::generate().expect("a");
        let b = Identity::generate().expect("b");
        let auth = a.advert_auth();
        let sig = auth.sign(b"hello");
        assert!(auth.verify(&a.id(), b"hello", &sig));
        assert!(!auth.verify(&b.id(), b"hello", &sig));
        assert!(!auth.verify(&a.id(), b"hellO", &sig));
    }

    #[test]
    fn allow_list_parses_comments_and_reports_bad_lines() {
        let a = Identity::generate().expect("a").id();
        let text = format!("# lab machines\n\n{a}  # bench 1\n");
        let list = AllowList::parse(Path::new("allow"), &text).expect("parse");
        assert!(list.contains(&a));
        assert_eq!(list.len(), 1);
        let err = AllowList::parse(Path::new("allow"), "nope\n").expect_err("bad");
        assert!(matches!(err, AllowListError::BadId { line: 1, .. }));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_cert_parser(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = peer_id_of_cert(&bytes);
        }
    }
}
