"""The station: several cameras in one ``edge-detect`` process, a live view in the browser, results to the line (MQTT,
webhook, evidence) with on-disk spools, changeovers, manifest reloads and a watchdog. Optional dependencies (extra
``[station]``: paho-mqtt, prometheus-client, scipy) are imported only when their feature is used."""
