//! Credentials onto the request: the provider says which headers, the route's `client_auth` says
//! what happens to headers of the same name the client sent itself.

use http::HeaderMap;

use crate::error::ProxyError;
use crate::route::{ClientAuth, Route};

pub fn apply(route: &Route, headers: &mut HeaderMap) -> Result<(), ProxyError> {
    for (name, value) in route.provider.credentials() {
        match route.client_auth {
            ClientAuth::Replace => {
                headers.insert(name.clone(), value.clone());
            }
            ClientAuth::Keep => {
                if !headers.contains_key(name) {
                    headers.insert(name.clone(), value.clone());
                }
            }
            ClientAuth::Reject => {
                if headers.contains_key(name) {
                    return Err(ProxyError::ClientCredentials {
                        header: name.to_string(),
                    });
                }
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    Ok(())
}
