//! Connecting to ferryd: `http://host:port`, `host:port`, or `unix:/path/to/socket`, with an
//! optional bearer token (needed over TCP when ferryd has `auth.tokens_file`).

use ferry_core::{Error, Result};
use ferry_proto::v1::inference_client::InferenceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub use ferry_core::token::Bearer;

/// An `Inference` client, with or without a token.
pub type Client = InferenceClient<InterceptedService<Channel, Bearer>>;

/// Opens a channel to a ferryd address.
pub async fn connect(addr: &str) -> Result<Channel> {
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = path.to_string();
        // The URI is required by the API but unused: the connector always dials the socket.
        let endpoint = Endpoint::try_from("http://ferryd.local")
            .map_err(|e| Error::invalid("addr", e.to_string()))?;
        return endpoint
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| Error::Unavailable(format!("connecting to {addr}: {e}")));
    }
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::try_from(uri)
        .map_err(|e| Error::invalid("addr", e.to_string()))?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("connecting to {addr}: {e}")))
}

/// An `Inference` client for `addr`, without a token.
pub async fn inference(addr: &str) -> Result<Client> {
    inference_with_token(addr, None).await
}

/// An `Inference` client for `addr` that presents `token` as a bearer token.
pub async fn inference_with_token(addr: &str, token: Option<&str>) -> Result<Client> {
    let bearer = Bearer::new(token, "token")?;
    Ok(
        InferenceClient::with_interceptor(connect(addr).await?, bearer)
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}
