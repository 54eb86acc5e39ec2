"""The shop in the admin: fix the poison product here, then requeue its dead receipts."""

from __future__ import annotations

from django.contrib import admin

from .models import GatewayCall, GatewayCharge, Order, Product, Receipt


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("name", "price", "breaks_receipts")
    list_editable = ("breaks_receipts",)


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("id", "customer", "product", "quantity", "total", "charge_id", "created_at")
    list_filter = ("product",)
    search_fields = ("id", "customer", "charge_id")


@admin.register(Receipt)
class ReceiptAdmin(admin.ModelAdmin):
    list_display = ("id", "order", "task_id", "sent_at")
    search_fields = ("order__id", "task_id")


@admin.register(GatewayCharge)
class GatewayChargeAdmin(admin.ModelAdmin):
    list_display = ("charge_id", "idempotency_key", "order_number", "amount", "created_at")
    search_fields = ("charge_id", "idempotency_key")


@admin.register(GatewayCall)
class GatewayCallAdmin(admin.ModelAdmin):
    list_display = ("idempotency_key", "outcome", "answered", "at")
    list_filter = ("outcome", "answered")
    search_fields = ("idempotency_key",)
