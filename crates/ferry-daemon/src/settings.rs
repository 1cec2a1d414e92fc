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
                $field:ident : $ty:ty = $env:literal => $($key:ident).+ ;
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
