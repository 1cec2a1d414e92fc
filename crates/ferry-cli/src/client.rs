//! Connecting to ferryd: `http://host:port`, `host:port`, or `unix:/path/to/socket`.

use ferry_core::{Error, Result};
use ferry_proto::v1::inference_client::InferenceClient;
use tonic::transport::{Channel, Endpoint};

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

/// An `Inference` client for `addr`.
pub async fn inference(addr: &str) -> Result<InferenceClient<Channel>> {
    Ok(InferenceClient::new(connect(addr).await?).max_decoding_message_size(64 * 1024 * 1024))
}
