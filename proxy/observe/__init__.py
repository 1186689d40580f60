"""What cedargate tells its operators about itself while it runs: the Prometheus metrics (`metrics`).

The bottom of the core, beside `vocabulary`: every other package may record a measurement here, so this
package imports none of them (only prometheus_client). Values come in as plain strings and numbers; what
they mean (an outcome, a policy's @id, an override's status) belongs to the package that records them.
"""
