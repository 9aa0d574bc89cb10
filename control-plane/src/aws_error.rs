//! AWS SDK errors as one short line that says what to do. The SDK's own
//! text (`DisplayErrorContext`) runs to over 1,000 characters for a missing
//! credential — every provider of the chain with its reason and a `Debug`
//! dump — and buries the one fact an operator needs. [`summarize`] finds
//! that fact (no credentials, rejected credentials, a missing permission, no
//! region, Cloud Map unreachable, a timeout, throttling) and words it as a
//! remedy; anything else is the service's code and message, cut short. The
//! caller logs the full text at debug level. Pure: no I/O, tested on the
//! SDK's own error types.

use std::error::Error;
use std::fmt::Debug;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_servicediscovery::error::{ProvideErrorMetadata, SdkError};

/// Longest part taken from an error's own text.
const MAX_DETAIL: usize = 160;

/// What went wrong, as far as the remedy differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NoCredentials,
    RejectedCredentials,
    AccessDenied,
    NoRegion,
    Unreachable,
    Timeout,
    Throttled,
    /// Any other error Cloud Map answered with.
    Service,
    Other,
}

/// The AWS error codes of credentials AWS does not accept.
const REJECTED_CREDENTIALS: &[&str] = &[
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidAccessKeyId",
];

const ACCESS_DENIED: &[&str] = &["AccessDeniedException", "AccessDenied", "UnauthorizedOperation", "NotAuthorized"];

pub const THROTTLED: &[&str] =
    &["RequestLimitExceeded", "ThrottlingException", "Throttling", "TooManyRequestsException"];

/// One line (no newline, at most ~250 characters) for `operation` failing with `error`.
pub fn summarize<E, R>(operation: &str, error: &SdkError<E, R>) -> (Kind, String)
where
    E: Error + ProvideErrorMetadata + 'static,
    R: Debug + 'static,
{
    if let Some(code) = error.code() {
        let message = error.message().map(short).unwrap_or_default();
        return if ACCESS_DENIED.contains(&code) {
            (Kind::AccessDenied, format!("access denied for servicediscovery:{operation}: grant it to the task role"))
        } else if REJECTED_CREDENTIALS.contains(&code) {
            (
                Kind::RejectedCredentials,
                format!(
                    "AWS rejected the credentials ({code}): check AWS_PROFILE / AWS_ACCESS_KEY_ID or the task role{}",
                    suffix(&message)
                ),
            )
        } else if THROTTLED.contains(&code) {
            (Kind::Throttled, format!("throttled by Cloud Map ({code}); backing off"))
        } else {
            (Kind::Service, format!("{code}{}", suffix(&message)))
        };
    }
    let chain = chain(error);
    if chain
        .iter()
        .any(|e| matches!(e.downcast_ref::<CredentialsError>(), Some(CredentialsError::CredentialsNotLoaded(_))))
    {
        return (
            Kind::NoCredentials,
            "no AWS credentials: set AWS_PROFILE / AWS_ACCESS_KEY_ID or use an ECS task role".into(),
        );
    }
    if let Some(credentials) = chain.iter().find_map(|e| e.downcast_ref::<CredentialsError>()) {
        let reason = short(&innermost(credentials));
        return (
            Kind::NoCredentials,
            format!("cannot load AWS credentials ({reason}): check AWS_PROFILE / AWS_ACCESS_KEY_ID or the task role"),
        );
    }
    // Endpoint rules say "Missing Region"; with an endpoint override, SigV4 says "missing signing region".
    if chain.iter().any(|e| {
        let text = e.to_string().to_ascii_lowercase();
        text.contains("missing region") || text.contains("missing signing region")
    }) {
        return (Kind::NoRegion, "no AWS region: set AWS_REGION".into());
    }
    let reason = short(&innermost(error));
    match error {
        SdkError::TimeoutError(_) => (Kind::Timeout, "Cloud Map did not answer in time; retrying".into()),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => {
            (Kind::Timeout, format!("Cloud Map did not answer in time ({reason}); retrying"))
        }
        SdkError::DispatchFailure(failure) if failure.is_io() => (
            Kind::Unreachable,
            format!("cannot reach Cloud Map ({reason}): check the network, AWS_REGION and AWS_ENDPOINT_URL"),
        ),
        _ => (Kind::Other, reason),
    }
}

fn suffix(message: &str) -> String {
    if message.is_empty() { String::new() } else { format!(": {message}") }
}

/// The error and its sources, outermost first.
fn chain<'a>(error: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
    let mut all = vec![error];
    let mut next = error.source();
    while let Some(e) = next {
        all.push(e);
        next = e.source();
    }
    all
}

/// The most specific text: the innermost source's, which is what the outer
/// layers wrap ("dispatch failure: io error: …: Connection refused").
fn innermost(error: &(dyn Error + 'static)) -> String {
    chain(error).last().map(|e| e.to_string()).unwrap_or_default()
}

/// First line, at most [`MAX_DETAIL`] characters.
fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    match line.char_indices().nth(MAX_DETAIL) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_servicediscovery::error::ErrorMetadata;
    use aws_sdk_servicediscovery::operation::list_namespaces::ListNamespacesError;
    use aws_smithy_runtime_api::client::endpoint::error::ResolveEndpointError;
    use aws_smithy_runtime_api::client::result::ConnectorError;

    type Sdk = SdkError<ListNamespacesError, ()>;

    fn service(code: &str, message: &str) -> Sdk {
        let meta = ErrorMetadata::builder().code(code).message(message).build();
        SdkError::service_error(ListNamespacesError::generic(meta), ())
    }

    fn dispatch(source: impl Error + Send + Sync + 'static) -> Sdk {
        SdkError::dispatch_failure(ConnectorError::other(Box::new(source), None))
    }

    #[derive(Debug)]
    struct Io(std::io::Error);
    impl std::fmt::Display for Io {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("io error")
        }
    }
    impl Error for Io {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_error_is_one_short_line_with_its_remedy() {
        let long = "x".repeat(5_000);
        let chain_text = "no credentials found in chain. Attempted:\n  Environment: not set\n  Profile: not enabled";
        let cases: Vec<(Sdk, Kind, &str)> = vec![
            (
                dispatch(CredentialsError::not_loaded(chain_text)),
                Kind::NoCredentials,
                "set AWS_PROFILE / AWS_ACCESS_KEY_ID or use an ECS task role",
            ),
            (dispatch(CredentialsError::not_loaded_no_source()), Kind::NoCredentials, "no AWS credentials"),
            (
                dispatch(CredentialsError::provider_error(format!("profile `nope` not found\n{long}"))),
                Kind::NoCredentials,
                "cannot load AWS credentials (profile `nope` not found",
            ),
            (
                service("AccessDeniedException", "User: arn:aws:sts::1:assumed-role/x is not authorized"),
                Kind::AccessDenied,
                "access denied for servicediscovery:ListNamespaces: grant it to the task role",
            ),
            (
                service("UnrecognizedClientException", "The security token included in the request is invalid."),
                Kind::RejectedCredentials,
                "AWS rejected the credentials (UnrecognizedClientException)",
            ),
            (service("ExpiredTokenException", ""), Kind::RejectedCredentials, "check AWS_PROFILE"),
            (service("ThrottlingException", "Rate exceeded"), Kind::Throttled, "throttled"),
            (service("NamespaceNotFound", &long), Kind::Service, "NamespaceNotFound: xxx"),
            (
                dispatch(ResolveEndpointError::message("Invalid Configuration: Missing Region")),
                Kind::NoRegion,
                "no AWS region: set AWS_REGION",
            ),
            (SdkError::construction_failure("missing signing region"), Kind::NoRegion, "set AWS_REGION"),
            (
                SdkError::dispatch_failure(ConnectorError::io(Box::new(Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "Connection refused (os error 111)",
                ))))),
                Kind::Unreachable,
                "cannot reach Cloud Map (Connection refused (os error 111)): check",
            ),
            (
                SdkError::timeout_error("operation timeout (all attempts including retries) occurred after 15s"),
                Kind::Timeout,
                "did not answer in time",
            ),
            (SdkError::construction_failure(long.clone()), Kind::Other, "xxx"),
        ];
        for (error, kind, needle) in cases {
            let (got_kind, line) = summarize("ListNamespaces", &error);
            assert_eq!(got_kind, kind, "{line}");
            assert!(line.contains(needle), "{line:?} lacks {needle:?}");
            assert!(!line.contains('\n'), "{line:?}");
            assert!(line.chars().count() <= 250, "{} chars: {line}", line.chars().count());
        }
    }
}
