"""The Billing view inside the Airflow UI (an Airflow 3 plugin): what the ledger says was delivered."""
