"""Built-in alerting: the conditions of conf/prometheus/alerts.yml evaluated by relayd itself,
for hosts without Prometheus (rules.py the rules as data, evaluator.py the windows and the
hysteresis, service.py the queue process's loop that reports to the event log and by mail)."""
