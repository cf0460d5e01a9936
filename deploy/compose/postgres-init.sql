-- Run once by the postgres image when its data volume is new: one database per svcard server
-- (each stamps its schema version in its own svcard_schema table). All belong to the svcard
-- role; give each server its own role for real separation (docs/deploy.md).
CREATE DATABASE payment;
CREATE DATABASE merchant;
CREATE DATABASE load;
CREATE DATABASE bank;
CREATE DATABASE clearing;
