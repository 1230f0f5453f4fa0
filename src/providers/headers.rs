//! `headers`: any set of static headers, e.g. StackBill's `apikey` + `secretKey` or Cloudneeti's
//! `Ocp-Apim-Subscription-Key`.

use http::{HeaderName, HeaderValue};

use super::sensitive_value;
use crate::secret::Secret;

pub fn header(name: &str, value: &Secret) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid HTTP header name"))?;
    if crate::forward::is_hop_by_hop(&name) || name == http::header::HOST {
        return Err(format!(
            "`{name}` is managed by the proxy and cannot be injected"
        ));
    }
    Ok((name, sensitive_value(value.expose())?))
}
