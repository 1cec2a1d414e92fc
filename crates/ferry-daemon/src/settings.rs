//! A daemon's command line, declared once per setting: [`settings!`](crate::settings!) turns
//! one line — the flag's name (the field's, in kebab case), its environment variable and the
//! config key it overrides, with the help text above it — into the clap field, the code that
//! writes it over the config file's value, and a table of all three names.
//!
//! Precedence, for every setting: a flag, else its environment variable (clap reads both), else
//! the config file, else the default.

/// Writes a flag's value over a config field: the field's own type, or an optional field (a
/// flag sets it).
pub trait Assign<T> {
    /// Overwrites `self` with `value`.
    fn assign(&mut self, value: T);
}

impl<T> Assign<T> for T {
    fn assign(&mut self, value: T) {
        *self = value;
    }
}

impl<T> Assign<T> for Option<T> {
    fn assign(&mut self, value: T) {
        *self = Some(value);
    }
}

/// Declares a daemon's settings struct (a `clap::Args` to `#[command(flatten)]` into its
/// parser) for config type `$config`:
///
/// ```ignore
/// ferry_daemon::settings! {
///     /// The flags of ferryd's settings.
///     pub struct Settings for EdgeConfig {
///         /// gRPC listen address.
///         grpc_addr: SocketAddr = "FERRY_GRPC_ADDR" => server.grpc_addr;
///         /// Model ids to load at start (comma-separated).
///         #[arg(value_delimiter = ',')]
///         load: Vec<String> = "FERRY_LOAD" => models.load;
///     }
/// }
/// ```
///
/// gives `--grpc-addr` / `FERRY_GRPC_ADDR` over `server.grpc_addr`, `Settings::apply(&self,
/// &mut EdgeConfig)`, and `Settings::TABLE` (flag field, variable, config key) for docs and
/// tests.
#[macro_export]
macro_rules! settings {
    (
        $(#[$struct_meta:meta])*
        pub struct $name:ident for $config:ty {
            $(
                $(#[$field_meta:meta])*
                $field:ident : $ty:ty = $env:expr => $($key:ident).+ ;
            )*
        }
    ) => {
        $(#[$struct_meta])*
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                #[arg(long, env = $env)]
                pub $field: Option<$ty>,
            )*
        }

        impl $name {
            /// (flag field, environment variable, config key segments) of every setting.
            pub const TABLE: &'static [(&'static str, &'static str, &'static [&'static str])] = &[
                $( (stringify!($field), $env, &[$(stringify!($key)),+]), )*
            ];

            /// Writes every setting given as a flag or variable over `config`.
            pub fn apply(&self, config: &mut $config) {
                $(
                    if let Some(v) = &self.$field {
                        $crate::settings::Assign::assign(&mut config.$($key).+, v.clone());
                    }
                )*
            }
        }
    };
}

/// The settings both daemons have, under their own variable prefix (`"FERRY_"` for ferryd,
/// `"FERRY_CLOUD_"` for ferry-cloud): the HTTP listener, slots, queue and drain
/// (`server.{http_enabled, http_addr, max_concurrent, max_queue, shutdown_grace_s}`), the token
/// file (`auth.*`), the request limits (`limits.*`), the energy meter (`energy.*`) and the logs
/// (`log.*`). `$config` needs those fields (`ferry_core::RequestLimits`,
/// `ferry_energy::EnergyConfig`, [`crate::config::LogConfig`] for the last three).
#[macro_export]
macro_rules! shared_settings {
    ($(#[$meta:meta])* pub struct $name:ident for $config:ty, prefix = $p:literal) => {
        $crate::settings! {
            $(#[$meta])*
            pub struct $name for $config {
                /// Serve HTTP: /healthz, /readyz and /metrics (ferryd: also its OpenAI-compatible
                /// API), true/false.
                http_enabled: bool = concat!($p, "HTTP_ENABLED") => server.http_enabled;
                /// HTTP listen address.
                http_addr: std::net::SocketAddr = concat!($p, "HTTP_ADDR") => server.http_addr;
                /// Requests generating at once (ferryd: a model's concurrent requests decode
                /// together, so this is also its batch size).
                max_concurrent: usize = concat!($p, "MAX_CONCURRENT") => server.max_concurrent;
                /// Requests allowed to wait for a slot; beyond: RESOURCE_EXHAUSTED.
                max_queue: usize = concat!($p, "MAX_QUEUE") => server.max_queue;
                /// Seconds to let in-flight requests finish on SIGTERM.
                shutdown_grace_s: u64 = concat!($p, "SHUTDOWN_GRACE_S") => server.shutdown_grace_s;
                /// Bearer token file (hashed tokens, `ferry token new`; reloaded on SIGHUP).
                tokens_file: std::path::PathBuf = concat!($p, "TOKENS_FILE") => auth.tokens_file;
                /// Allow a non-loopback listener without authentication (true/false).
                allow_unauthenticated_network: bool =
                    concat!($p, "ALLOW_UNAUTHENTICATED_NETWORK") => auth.allow_unauthenticated_network;
                /// Most messages per request.
                max_messages: usize = concat!($p, "MAX_MESSAGES") => limits.max_messages;
                /// Most text bytes per request.
                max_text_bytes: usize = concat!($p, "MAX_TEXT_BYTES") => limits.max_text_bytes;
                /// Most images per request.
                max_images: usize = concat!($p, "MAX_IMAGES") => limits.max_images;
                /// Most bytes per image.
                max_image_bytes: usize = concat!($p, "MAX_IMAGE_BYTES") => limits.max_image_bytes;
                /// Most stop strings per request.
                max_stop_sequences: usize =
                    concat!($p, "MAX_STOP_SEQUENCES") => limits.max_stop_sequences;
                /// Largest max_tokens a request may ask for.
                max_new_tokens: u32 = concat!($p, "MAX_NEW_TOKENS") => limits.max_new_tokens;
                /// max_tokens when a request sets none.
                default_max_tokens: u32 =
                    concat!($p, "DEFAULT_MAX_TOKENS") => limits.default_max_tokens;
                /// Most prompt tokens after the chat template (candle models; also capped by the
                /// model's context).
                max_prompt_tokens: u32 =
                    concat!($p, "MAX_PROMPT_TOKENS") => limits.max_prompt_tokens;
                /// Energy sources: auto, or a comma list of nvml, rapl, ina3221, estimate.
                #[arg(value_delimiter = ',')]
                energy_sources: Vec<String> = concat!($p, "ENERGY_SOURCES") => energy.sources;
                /// Energy sampler rate in Hz.
                energy_sample_hz: f64 = concat!($p, "ENERGY_SAMPLE_HZ") => energy.sample_hz;
                /// Jetson INA3221 rails to count (comma-separated).
                #[arg(value_delimiter = ',')]
                energy_rails: Vec<String> = concat!($p, "ENERGY_RAILS") => energy.rails;
                /// Estimate: package power at full CPU utilisation, watts.
                energy_package_watts: f64 =
                    concat!($p, "ENERGY_PACKAGE_WATTS") => energy.package_watts;
                /// Estimate: idle package power, watts.
                energy_idle_watts: f64 = concat!($p, "ENERGY_IDLE_WATTS") => energy.idle_watts;
                /// Root of the sysfs tree the energy sources read.
                energy_sysfs_root: std::path::PathBuf =
                    concat!($p, "ENERGY_SYSFS_ROOT") => energy.sysfs_root;
                /// Log format: text or json.
                log_format: String = concat!($p, "LOG_FORMAT") => log.format;
                /// Log filter, e.g. info or ferry_edge=debug,info.
                log_level: String = concat!($p, "LOG_LEVEL") => log.level;
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    #[derive(Debug, Default, PartialEq)]
    pub struct Server {
        port: u16,
        socket: Option<PathBuf>,
    }

    #[derive(Debug, Default, PartialEq)]
    pub struct Config {
        server: Server,
        names: Vec<String>,
    }

    crate::settings! {
        /// Test settings.
        pub struct Flags for Config {
            /// The port.
            port: u16 = "FERRY_TEST_SETTINGS_PORT" => server.port;
            /// A socket.
            socket: PathBuf = "FERRY_TEST_SETTINGS_SOCKET" => server.socket;
            /// Names (comma-separated).
            #[arg(value_delimiter = ',')]
            names: Vec<String> = "FERRY_TEST_SETTINGS_NAMES" => names;
        }
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: Flags,
    }

    #[test]
    fn a_flag_overrides_its_key_and_an_absent_flag_keeps_the_file_value() {
        let cli = Cli::parse_from(["t", "--socket", "/run/x.sock", "--names", "a,b"]);
        let mut c = Config {
            server: Server {
                port: 7,
                socket: None,
            },
            names: vec!["z".into()],
        };
        cli.flags.apply(&mut c);
        assert_eq!(c.server.port, 7, "no flag: the file's value stays");
        assert_eq!(c.server.socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!(c.names, vec!["a", "b"]);
        let cli = Cli::parse_from(["t", "--port", "9"]);
        cli.flags.apply(&mut c);
        assert_eq!(c.server.port, 9);
        assert_eq!(
            Flags::TABLE[0],
            ("port", "FERRY_TEST_SETTINGS_PORT", &["server", "port"][..])
        );
    }
}
